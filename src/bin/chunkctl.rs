//! `chunkctl`: the admin CLI. It reads the cluster map from a chunkserver configuration file
//! (its `[cluster]` section) and talks to the nodes' client listeners.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::config::{ByteSize, Config};
use dataplane::ids::CopysetId;
use dataplane::net::auth::{role_key, Keys, Role};
use dataplane::net::handshake::{key_text, Auth};
use dataplane::protocol::Membership;
use dataplane::volume;
use dataplane::volume::pool;
use dataplane::volume_table::{VolumeLayout, VolumeRecord};
use glommio::{LocalExecutorBuilder, Placement};
use serde_json::json;

/// Administers a chunkserver cluster.
/// Exit codes: 0 done, 1 an error (the cluster refused, or a table said no), 2 bad usage
/// (arguments, the configuration file), 3 the cluster unavailable (no node answered before
/// the deadline).
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNAVAILABLE: u8 = 3;

/// A long operation's progress, on stderr: a bar on a terminal, a line at every tenth
/// otherwise, and JSON lines (`{"event": "progress", …}`) with `--json`, whose result stays
/// the one JSON object on stdout.
struct Progress {
    op: &'static str,
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    said: std::cell::Cell<u64>,
}

impl Progress {
    fn new(op: &'static str, json: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} chunks ({elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(op);
            bar
        });
        Progress {
            op,
            json,
            bar,
            said: std::cell::Cell::new(u64::MAX),
        }
    }

    fn update(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        let tenth = done * 10 / total.max(1);
        if tenth == self.said.get() {
            return;
        }
        self.said.set(tenth);
        if self.json {
            eprintln!(
                "{}",
                json!({"event": "progress", "op": self.op, "done": done, "total": total})
            );
        } else {
            eprintln!("{}: {done}/{total} chunks", self.op);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A usage error: the arguments do not make a command.
fn usage(message: String) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message,
    }
}

/// Why a command failed, with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure {
            code: EXIT_ERROR,
            message,
        }
    }
}

impl From<dataplane::client::ClientError> for Failure {
    fn from(error: dataplane::client::ClientError) -> Failure {
        use dataplane::client::ClientError;
        let code = match error {
            ClientError::Deadline { .. } | ClientError::NoNodes(_) => EXIT_UNAVAILABLE,
            _ => EXIT_ERROR,
        };
        Failure {
            code,
            message: error.to_string(),
        }
    }
}

impl From<volume::VolumeError> for Failure {
    fn from(error: volume::VolumeError) -> Failure {
        match error {
            volume::VolumeError::Client(error) => Failure::from(error),
            other => Failure::from(other.to_string()),
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "chunkctl", version)]
struct Cli {
    /// A chunkserver configuration file whose `[cluster]` section lists the nodes.
    #[arg(long, global = true, default_value = "configs/demo/node1.toml")]
    config: PathBuf,
    /// Output JSON for scripts instead of text for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Nodes, copysets, leaders and replication lag.
    Status,
    /// Exits non-zero when a node is unreachable, a copyset has no leader, or a replica lags.
    Health {
        /// Entries a replica may be behind its leader before it counts as lagging.
        #[arg(long, default_value_t = 1000)]
        max_lag: u64,
    },
    /// Copyset commands.
    #[command(subcommand)]
    Copyset(CopysetCommand),
    /// Volume commands (the volume table lives in the metadata copyset).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The placement service's scheduler (recoveries, leader balancing): `pause`, `resume`,
    /// `status`, `operators` (what runs), or `cancel --copyset ID` (stop a recovery operator).
    Scheduler {
        /// `pause`, `resume`, `status`, `operators` or `cancel`.
        action: String,
        /// The copyset whose operator `cancel` stops.
        #[arg(long, value_parser = parse_copyset)]
        copyset: Option<u64>,
    },
    /// Compares what the replicas of copysets hold, page by page (crc32c of each page, taken
    /// by every replica at the same log position while writes go on), and reports each page a
    /// replica holds differently from the majority; `--repair` rewrites those from the
    /// majority. Exits 1 while a difference is left.
    Scrub {
        /// The copyset to scrub (a number, or `meta`); without it, every copyset of the nodes.
        #[arg(long, value_parser = parse_copyset)]
        copyset: Option<u64>,
        /// Rewrite the pages a replica holds wrong from the majority.
        #[arg(long)]
        repair: bool,
        /// MiB of chunk data per second each replica reads for the scrub (0: unlimited).
        #[arg(long, default_value_t = 64)]
        mib_per_s: u64,
    },
    /// Authentication (`[auth]`): `derive-key --role ROLE` prints the key of one role, from the
    /// cluster secret, for a machine that should have that role only.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// The chunkservers as the placement service sees them: labels, state (up, unstable,
    /// offline, unknown), last heartbeat, chunk slots, replicas and leaders.
    Topology,
    /// The pool of copysets striped volumes spread over: each copyset's nodes, state and
    /// leader (`--create` plans and creates it from `[placement]` if it does not exist).
    Pool {
        /// Create the pool if there is none.
        #[arg(long)]
        create: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Prints the key of `--role` (64 hex digits) derived from `[auth] secret_file`: put it in
    /// a file of mode 600 named by `[auth] key_file`, with `[auth] role`, on a client machine.
    DeriveKey {
        /// `client`, `admin` or `peer`.
        #[arg(long)]
        role: String,
    },
}

/// `chunkctl auth derive-key --role ROLE`.
fn derive_key(auth: Option<&Auth>, role: &str) -> ExitCode {
    let Some(role) = Role::parse(role) else {
        eprintln!("error: --role {role}: expected client, admin or peer");
        return ExitCode::from(EXIT_USAGE);
    };
    match auth.map(|a| &a.keys) {
        Some(Keys::Secret(secret)) => {
            println!("{}", key_text(&role_key(secret, role)));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("error: derive-key needs [auth] secret_file (the cluster secret) in the configuration");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Creates a volume in the volume table (and the metadata and data copysets on the first
    /// three nodes when they are missing).
    Create {
        /// The volume's name (its NBD export name).
        #[arg(long)]
        name: String,
        /// Its size, with a suffix (`64MiB`, `1GiB`); a multiple of 4 KiB.
        #[arg(long)]
        size: String,
        /// Put every chunk in this one copyset (created on the first three nodes if missing)
        /// instead of striping the volume over the pool's copysets.
        #[arg(long, value_parser = parse_copyset)]
        copyset: Option<u64>,
    },
    /// Shows which copysets hold a striped volume's allocated segments.
    Map {
        /// The volume's name.
        #[arg(long)]
        name: String,
    },
    /// Lists the volumes.
    List,
    /// Shows one volume.
    Info {
        /// The volume's name.
        #[arg(long)]
        name: String,
    },
    /// Deletes a volume and its chunks (refused while it has snapshots).
    Delete {
        /// The volume's name.
        #[arg(long)]
        name: String,
    },
    /// Snapshots of a striped volume: crash-consistent, taken while I/O goes on.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Copies a snapshot into a new volume (`--from VOLUME@SNAPSHOT`), now: every chunk the
    /// snapshot holds is copied (a lazy clone, reading through to the snapshot, is not done
    /// yet).
    Clone {
        /// The snapshot to copy: VOLUME@SNAPSHOT.
        #[arg(long)]
        from: String,
        /// The new volume's name.
        #[arg(long)]
        name: String,
    },
    /// Rolls a volume back to one of its snapshots (stop its exports first).
    Rollback {
        /// The volume's name.
        #[arg(long)]
        name: String,
        /// The snapshot.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Takes a snapshot of the volume now (one per volume in this version).
    Create {
        /// The volume's name.
        #[arg(long)]
        volume: String,
        /// The snapshot's name.
        #[arg(long)]
        name: String,
    },
    /// Lists the volume's snapshots.
    List {
        /// The volume's name.
        #[arg(long)]
        volume: String,
    },
    /// Shows one snapshot.
    Info {
        /// The volume's name.
        #[arg(long)]
        volume: String,
        /// The snapshot's name.
        #[arg(long)]
        name: String,
    },
    /// Deletes a snapshot and the chunk versions only it kept (run again to finish one that
    /// stopped).
    Delete {
        /// The volume's name.
        #[arg(long)]
        volume: String,
        /// The snapshot's name.
        #[arg(long)]
        name: String,
    },
}

fn snapshot_json(info: &volume::snapshot::SnapshotInfo) -> serde_json::Value {
    json!({
        "name": info.name,
        "seq": info.seq,
        "created_ms": info.created_ms,
        "state": info.state.name(),
        "chunks": info.chunks,
    })
}

fn print_snapshots(volume: &str, list: &[volume::snapshot::SnapshotInfo], json_output: bool) {
    if json_output {
        let list: Vec<_> = list.iter().map(snapshot_json).collect();
        println!("{}", json!({ "volume": volume, "snapshots": list }));
        return;
    }
    println!(
        "{:<24} {:>6} {:<9} {:>8} {:>16}",
        "snapshot", "seq", "state", "chunks", "created (ms)"
    );
    for info in list {
        println!(
            "{:<24} {:>6} {:<9} {:>8} {:>16}",
            info.name,
            info.seq,
            info.state.name(),
            info.chunks.map_or("-".to_string(), |c| c.to_string()),
            info.created_ms
        );
    }
}

/// `chunkctl volume clone --from VOLUME@SNAPSHOT --name NEW`, with a progress line every
/// tenth of the chunks (on stderr, so that `--json` output stays one object).
async fn clone_command(
    client: &Rc<Client>,
    from: &str,
    name: &str,
    json_output: bool,
) -> Result<(), Failure> {
    let Some((volume, snapshot)) = from.split_once('@') else {
        return Err(usage(format!("--from {from}: expected VOLUME@SNAPSHOT")));
    };
    let started = std::time::Instant::now();
    let progress = Progress::new("clone", json_output);
    let created = volume::snapshot::clone_snapshot(client, volume, snapshot, name, &|d, t| {
        progress.update(d, t)
    })
    .await
    .map_err(Failure::from);
    progress.finish();
    let created = created?;
    let seconds = started.elapsed().as_secs_f64();
    if json_output {
        println!(
            "{}",
            json!({ "cloned": name, "from": from, "size": created.size, "seconds": seconds })
        );
    } else {
        println!("volume {name} cloned from {from} in {seconds:.2} s");
    }
    Ok(())
}

/// `chunkctl scrub`: one copyset, or every copyset the nodes hold.
async fn scrub_command(
    client: &Client,
    ids: &[u64],
    copyset: Option<u64>,
    (repair, mib_per_s): (bool, u64),
    json_output: bool,
) -> Result<(), Failure> {
    let copysets: Vec<CopysetId> = match copyset {
        Some(id) => vec![CopysetId(id)],
        None => {
            let mut all = std::collections::BTreeSet::new();
            for node in ids {
                match client.list_copysets(*node).await {
                    Ok(list) => all.extend(list),
                    Err(error) => eprintln!("node {node}: not listed: {error}"),
                }
            }
            all.into_iter().collect()
        }
    };
    let options = dataplane::client::scrub::ScrubOptions {
        repair,
        bytes_per_s: mib_per_s.saturating_mul(1 << 20),
    };
    let mut reports = Vec::new();
    for copyset in copysets {
        let progress = Progress::new("scrub", json_output);
        let report = client
            .scrub_copyset(copyset, options, |d, t| progress.update(d, t))
            .await;
        progress.finish();
        let report = report.map_err(Failure::from)?;
        if !json_output {
            print_scrub(&report);
        }
        reports.push(report);
    }
    if json_output {
        println!("{}", json!({ "scrubbed": reports }));
    }
    let left = reports.iter().filter(|r| !r.is_clean()).count();
    if left == 0 {
        Ok(())
    } else {
        Err(Failure::from(format!(
            "{left} copyset(s) with replicas that differ{}",
            if repair {
                " after the repair"
            } else {
                "; --repair rewrites them from the majority"
            }
        )))
    }
}

fn print_scrub(report: &dataplane::client::scrub::CopysetScrub) {
    let copyset = CopysetId(report.copyset);
    println!(
        "copyset {copyset}: {} chunk(s), {} MiB compared on voters {:?}: {}",
        report.chunks,
        report.bytes >> 20,
        report.voters,
        if report.bad_pages.is_empty() && report.is_clean() {
            "replicas agree".to_string()
        } else {
            format!(
                "{} page(s) differ, {} repaired",
                report.bad_pages.len(),
                report.repaired
            )
        }
    );
    for page in &report.bad_pages {
        println!(
            "  node {} chunk {} offset {}: crc32c {:08x}, majority {:08x}{}",
            page.node,
            page.chunk,
            page.offset,
            page.bad,
            page.good,
            if page.repaired { " (repaired)" } else { "" }
        );
    }
    for (chunk, offset) in &report.undecided_pages {
        println!("  chunk {chunk} offset {offset}: no majority, not repaired");
    }
    for (chunk, node) in &report.presence {
        println!("  chunk {chunk}: node {node} differs from the majority in having it");
    }
    for why in &report.unanswered {
        println!("  not compared: {why}");
    }
}

/// `chunkctl volume snapshot …` and `chunkctl volume rollback`.
async fn snapshot_command(
    client: &Client,
    command: SnapshotCommand,
    json_output: bool,
) -> Result<(), Failure> {
    use volume::snapshot;
    match command {
        SnapshotCommand::Create { volume, name } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let started = std::time::Instant::now();
            let progress = Progress::new("snapshot create", json_output);
            let info = snapshot::create_snapshot(client, &volume, &name, now, &|d, t| {
                progress.update(d, t)
            })
            .await
            .map_err(Failure::from);
            progress.finish();
            let info = info?;
            if json_output {
                println!("{}", snapshot_json(&info));
            } else {
                println!(
                    "snapshot {volume}@{} created in {:.2} s: sequence number {}, {} chunks",
                    info.name,
                    started.elapsed().as_secs_f64(),
                    info.seq,
                    info.chunks.unwrap_or(0)
                );
            }
        }
        SnapshotCommand::List { volume } => {
            let (_, list) = snapshot::list_snapshots(client, &volume)
                .await
                .map_err(Failure::from)?;
            print_snapshots(&volume, &list, json_output);
        }
        SnapshotCommand::Info { volume, name } => {
            let (_, list) = snapshot::list_snapshots(client, &volume)
                .await
                .map_err(Failure::from)?;
            let found: Vec<_> = list.into_iter().filter(|s| s.name == name).collect();
            if found.is_empty() {
                return Err(format!("volume {volume} has no snapshot named {name:?}").into());
            }
            print_snapshots(&volume, &found, json_output);
        }
        SnapshotCommand::Delete { volume, name } => {
            let progress = Progress::new("snapshot delete", json_output);
            let deleted =
                snapshot::delete_snapshot(client, &volume, &name, &|d, t| progress.update(d, t))
                    .await
                    .map_err(Failure::from);
            progress.finish();
            deleted?;
            if json_output {
                println!("{}", json!({ "deleted": name, "volume": volume }));
            } else {
                println!("snapshot {volume}@{name} deleted");
            }
        }
    }
    Ok(())
}

fn volume_json(volume: &VolumeRecord) -> serde_json::Value {
    let mut out = json!({
        "name": volume.name,
        "size": volume.size,
        "chunks": volume.chunks(),
        "chunk_size": volume.chunk_size,
    });
    match volume.layout {
        VolumeLayout::Single {
            copyset,
            first_chunk,
        } => {
            out["layout"] = json!("single");
            out["copyset"] = json!(copyset.0);
            out["first_chunk"] = json!(first_chunk.0);
        }
        VolumeLayout::Striped { id, segment_size } => {
            out["layout"] = json!("striped");
            out["id"] = json!(id);
            out["segment_size"] = json!(segment_size);
            out["segments"] = json!(volume.segments());
        }
    }
    out
}

/// Creates a volume on one copyset, or (without one) striped over the pool, creating the
/// metadata copyset and the pool first when missing.
async fn create_volume(
    client: &Client,
    config: &Config,
    ids: &[u64],
    name: &str,
    size: u64,
    copyset: Option<u64>,
) -> Result<VolumeRecord, Failure> {
    let peers = volume::default_peers(ids);
    volume::ensure_metadata_copyset(client, &peers)
        .await
        .map_err(Failure::from)?;
    let created = match copyset {
        Some(copyset) => {
            client
                .create_copyset(CopysetId(copyset), &peers)
                .await
                .map_err(Failure::from)?;
            volume::create_volume(client, name, size, CopysetId(copyset)).await
        }
        None => {
            pool::ensure_pool(
                client,
                &pool::PoolSettings::for_cluster(client, config).await,
            )
            .await
            .map_err(|e| format!("the pool: {e}"))?;
            let segment = config
                .placement
                .segment_bytes(config.storage.chunk_size.bytes());
            pool::create_striped_volume(client, name, size, segment).await
        }
    };
    created.map_err(Failure::from)
}

/// `chunkctl volume map`: the allocated segments of a striped volume and their copysets.
async fn show_map(client: &Client, name: &str, json_output: bool) -> Result<(), Failure> {
    let found = volume::find_volume(client, name)
        .await
        .map_err(Failure::from)?;
    let VolumeLayout::Striped { id, .. } = found.layout else {
        return Err(format!("volume {name} is not striped: {}", found.layout).into());
    };
    let mut segments = Vec::new();
    for segment in 0..found.segments() {
        if let Some(record) = pool::read_segment(client, id, segment)
            .await
            .map_err(Failure::from)?
        {
            segments.push(record);
        }
    }
    let load = pool::chunks_per_copyset(&segments);
    if json_output {
        let list: Vec<serde_json::Value> = segments
            .iter()
            .map(|s| json!({"segment": s.segment, "copysets": s.copysets.iter().map(|c| c.0).collect::<Vec<_>>()}))
            .collect();
        let per: BTreeMap<String, usize> =
            load.iter().map(|(c, n)| (c.0.to_string(), *n)).collect();
        println!(
            "{}",
            json!({"volume": name, "segments": found.segments(), "allocated": list, "chunks_per_copyset": per})
        );
    } else {
        println!(
            "volume {name}: {} of {} segments allocated, chunks on {} copysets",
            segments.len(),
            found.segments(),
            load.len()
        );
        println!("{:>20} {:>8}", "copyset", "chunks");
        for (copyset, chunks) in &load {
            println!("{:>20} {:>8}", copyset.0, chunks);
        }
    }
    Ok(())
}

/// `chunkctl scheduler pause|resume|status|operators|cancel`.
async fn scheduler(
    client: &Client,
    action: &str,
    copyset: Option<u64>,
    json_output: bool,
) -> Result<(), Failure> {
    match (action, copyset) {
        ("pause" | "resume", None) => pool::set_scheduler_paused(client, action == "pause")
            .await
            .map_err(Failure::from)?,
        ("status", None) => {}
        ("operators", None) => return operators(client, None, json_output).await,
        ("cancel", Some(copyset)) => {
            return operators(client, Some(CopysetId(copyset)), json_output).await
        }
        ("cancel", None) => return Err(usage("scheduler cancel: --copyset ID is required".into())),
        (_, Some(_)) => {
            return Err(usage(format!(
                "scheduler {action}: --copyset goes with cancel only"
            )))
        }
        (other, None) => {
            return Err(usage(format!(
                "scheduler {other}: expected pause, resume, status, operators or cancel"
            )))
        }
    }
    let settings = pool::read_settings(client).await.map_err(Failure::from)?;
    if json_output {
        println!("{}", json!({ "paused": settings.paused }));
    } else if settings.paused {
        println!("scheduler paused: no recovery or leader move starts");
    } else {
        println!("scheduler running");
    }
    Ok(())
}

/// `chunkctl scheduler operators` (and `cancel`, which lists them after the cancel).
async fn operators(
    client: &Client,
    cancel: Option<CopysetId>,
    json_output: bool,
) -> Result<(), Failure> {
    let answer = client.operators(cancel).await.map_err(Failure::from)?;
    if json_output {
        println!(
            "{}",
            serde_json::to_string(&answer).map_err(|e| Failure::from(e.to_string()))?
        );
        return Ok(());
    }
    if let Some(copyset) = cancel {
        println!("cancelled the operator of copyset {}", copyset.0);
    }
    println!("placement service: node {}", answer.service);
    if answer.operators.is_empty() {
        println!("no operators");
        return Ok(());
    }
    println!(
        "{:>20} {:<16} {:>5} {:>5} {:<11} {:>9}",
        "copyset", "kind", "from", "to", "state", "age (s)"
    );
    for operator in &answer.operators {
        println!(
            "{:>20} {:<16} {:>5} {:>5} {:<11} {:>9.1}",
            operator.copyset,
            operator.kind,
            operator.from,
            operator.to,
            operator.state,
            operator.age_ms as f64 / 1000.0
        );
    }
    Ok(())
}

/// `chunkctl topology`: the placement service's view of the chunkservers.
async fn show_topology(client: &Client, json_output: bool) -> Result<(), Failure> {
    let topology = client.topology().await.map_err(Failure::from)?;
    if json_output {
        println!(
            "{}",
            serde_json::to_string(&topology).map_err(|e| Failure::from(e.to_string()))?
        );
        return Ok(());
    }
    println!("placement service: node {}", topology.service);
    println!(
        "{:>6} {:<12} {:<16} {:<9} {:>9} {:>6} {:>12} {:>9} {:>8}",
        "node", "zone", "host", "state", "last (s)", "shards", "free slots", "replicas", "leaders"
    );
    for node in &topology.nodes {
        let age = node.age_ms.map_or_else(
            || "-".to_string(),
            |ms| format!("{:.1}", ms as f64 / 1000.0),
        );
        let (shards, slots, replicas, leaders) = node.last.as_ref().map_or_else(
            || ("-".into(), "-".into(), "-".into(), "-".into()),
            |h| {
                let leaders = h.replicas.iter().filter(|r| r.role == "leader").count();
                (
                    h.shards.to_string(),
                    format!("{}/{}", h.slots_free, h.slots_total),
                    h.replicas.len().to_string(),
                    leaders.to_string(),
                )
            },
        );
        println!(
            "{:>6} {:<12} {:<16} {:<9} {:>9} {:>6} {:>12} {:>9} {:>8}",
            node.node, node.zone, node.host, node.state, age, shards, slots, replicas, leaders
        );
    }
    Ok(())
}

/// `chunkctl pool`: the pool's copysets, their nodes, state and current leader.
async fn show_pool(
    client: &Client,
    config: &Config,
    ids: &[u64],
    create: bool,
    json_output: bool,
) -> Result<(), Failure> {
    let copysets = if create {
        volume::ensure_metadata_copyset(client, &volume::default_peers(ids))
            .await
            .map_err(Failure::from)?;
        pool::ensure_pool(
            client,
            &pool::PoolSettings::for_cluster(client, config).await,
        )
        .await
    } else {
        pool::read_pool(client).await
    }
    .map_err(Failure::from)?;
    let mut rows = Vec::new();
    for copyset in &copysets {
        let mut leader = None;
        for &node in &copyset.peers {
            if let Ok(status) = client.copyset_status(node, copyset.copyset).await {
                if status.leader != 0 {
                    leader = Some(status.leader);
                    break;
                }
            }
        }
        rows.push((copyset, leader));
    }
    if json_output {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, leader)| {
                json!({"copyset": c.copyset.0, "peers": c.peers, "state": format!("{:?}", c.state).to_lowercase(), "leader": leader})
            })
            .collect();
        println!("{}", json!({ "pool": list }));
    } else {
        println!(
            "{:>20} {:<16} {:<8} {:>6}",
            "copyset", "peers", "state", "leader"
        );
        for (c, leader) in &rows {
            let peers: Vec<String> = c.peers.iter().map(u64::to_string).collect();
            let leader = leader.map_or_else(|| "-".to_string(), |l| l.to_string());
            println!(
                "{:>20} {:<16} {:<8} {:>6}",
                c.copyset.0,
                peers.join(","),
                format!("{:?}", c.state).to_lowercase(),
                leader
            );
        }
    }
    Ok(())
}

fn print_volume(volume: &VolumeRecord, json_output: bool) {
    if json_output {
        println!("{}", volume_json(volume));
        return;
    }
    match volume.layout {
        VolumeLayout::Single {
            copyset,
            first_chunk,
        } => println!(
            "volume {}: {} bytes on copyset {}, chunks {}..{} ({} of {} bytes)",
            volume.name,
            volume.size,
            copyset,
            first_chunk,
            first_chunk.0 + volume.chunks(),
            volume.chunks(),
            volume.chunk_size
        ),
        VolumeLayout::Striped { id, segment_size } => println!(
            "volume {}: {} bytes striped over the pool (id {id}): {} segments of {segment_size} \
             bytes, {} chunks of {} bytes, allocated on first write",
            volume.name,
            volume.size,
            volume.segments(),
            volume.chunks(),
            volume.chunk_size
        ),
    }
}

#[derive(Subcommand, Debug)]
enum CopysetCommand {
    /// Creates a copyset on its initial peers.
    Create {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node ids of the initial voters, comma-separated.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<u64>,
    },
    /// Hands a copyset's leadership to another voter.
    TransferLeader {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node id of the new leader.
        #[arg(long)]
        to: u64,
    },
    /// Adds a node as a voter: creates its replica, then changes the membership (answered
    /// once the change is applied on the leader). The new replica copies the copyset from the
    /// leader's snapshot.
    AddPeer {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node id to add.
        #[arg(long)]
        node: u64,
        /// Optional: the copyset's voters when it was created, comma-separated. With them
        /// the new replica starts from the same bootstrap as the others and may take the
        /// leader's log from index 2; without them it starts empty and installs the leader's
        /// snapshot.
        #[arg(long, value_delimiter = ',')]
        initial_peers: Vec<u64>,
    },
    /// Removes a node from the copyset's membership.
    RemovePeer {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node id to remove.
        #[arg(long)]
        node: u64,
    },
    /// Deletes a node's replica of a copyset, and its chunks (remove the node from the
    /// membership first).
    Delete {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node whose replica goes.
        #[arg(long)]
        node: u64,
    },
    /// Disaster recovery: forces the membership of the replicas on the given nodes to exactly
    /// those nodes, without consensus, for a copyset whose quorum is lost for good. Every
    /// node named must be up; writes a majority acknowledged but that none of them holds are
    /// lost.
    ResetPeers {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// The surviving nodes that become the voters, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<u64>,
        /// Confirms that writes no named voter holds may be lost (the nodes refuse without).
        #[arg(long)]
        confirm_data_loss: bool,
        /// The nodes' admin token file (their `[admin] token_file`).
        #[arg(long)]
        admin_token_file: std::path::PathBuf,
    },
    /// Makes the given nodes the copyset's voters, adding and removing in one change (joint
    /// consensus when more than one voter changes), e.g. to replace a node.
    ChangePeers {
        /// Copyset id (a number, or `meta` for the metadata copyset).
        #[arg(long, value_parser = parse_copyset)]
        id: u64,
        /// Node ids of the voters wanted, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<u64>,
        /// Optional: the copyset's voters when it was created, comma-separated (see
        /// `add-peer`).
        #[arg(long, value_delimiter = ',')]
        initial_peers: Vec<u64>,
    },
}

fn print_membership(copyset: u64, membership: &Membership, json_output: bool) {
    if json_output {
        println!(
            "{}",
            json!({
                "copyset": copyset,
                "voters": membership.voters,
                "voters_outgoing": membership.voters_outgoing,
                "learners": membership.learners,
            })
        );
        return;
    }
    let mut line = format!(
        "copyset {}: voters {:?}",
        CopysetId(copyset),
        membership.voters
    );
    if membership.is_joint() {
        line += &format!(" (joint with {:?})", membership.voters_outgoing);
    }
    if !membership.learners.is_empty() {
        line += &format!(", learners {:?}", membership.learners);
    }
    println!("{line}");
}

/// One replica as a status line shows it.
#[derive(Debug, Clone)]
struct Replica {
    node: u64,
    role: &'static str,
    term: u64,
    commit: u64,
    applied: u64,
    leader: u64,
    voters: Vec<u64>,
}

#[derive(Debug, Default)]
struct ClusterStatus {
    unreachable: Vec<(u64, String)>,
    copysets: BTreeMap<u64, Vec<Replica>>,
}

/// A copyset id as typed: a number, or `meta` for the metadata copyset.
fn parse_copyset(text: &str) -> Result<u64, String> {
    text.parse::<CopysetId>().map(|c| c.0)
}

fn role_name(role: u8) -> &'static str {
    match role {
        3 => "leader",
        2 => "candidate",
        1 => "pre-candidate",
        _ => "follower",
    }
}

async fn gather(client: &Client, nodes: &[u64]) -> ClusterStatus {
    let mut status = ClusterStatus::default();
    for &node in nodes {
        let copysets = match client.list_copysets(node).await {
            Ok(copysets) => copysets,
            Err(error) => {
                status.unreachable.push((node, error.to_string()));
                continue;
            }
        };
        for copyset in copysets {
            match client.copyset_status(node, copyset).await {
                Ok(s) => status.copysets.entry(copyset.0).or_default().push(Replica {
                    node,
                    role: role_name(s.role),
                    term: s.term,
                    commit: s.commit,
                    applied: s.applied,
                    leader: s.leader,
                    voters: s.membership.voters,
                }),
                Err(error) => status.unreachable.push((node, error.to_string())),
            }
        }
    }
    status
}

/// Problems that make the cluster unhealthy.
fn problems(status: &ClusterStatus, max_lag: u64) -> Vec<String> {
    let mut found: Vec<String> = status
        .unreachable
        .iter()
        .map(|(n, e)| format!("node {n} unreachable: {e}"))
        .collect();
    for (copyset, replicas) in &status.copysets {
        let Some(leader) = replicas.iter().find(|r| r.role == "leader") else {
            found.push(format!("copyset {} has no leader", CopysetId(*copyset)));
            continue;
        };
        for replica in replicas {
            let lag = leader.applied.saturating_sub(replica.applied);
            if lag > max_lag {
                found.push(format!(
                    "copyset {}: node {} lags by {lag} entries",
                    CopysetId(*copyset),
                    replica.node
                ));
            }
        }
    }
    found
}

fn print_status(status: &ClusterStatus, json_output: bool) {
    if json_output {
        let copysets: Vec<_> = status
            .copysets
            .iter()
            .map(|(id, replicas)| {
                let leader_applied = replicas
                    .iter()
                    .find(|r| r.role == "leader")
                    .map(|r| r.applied)
                    .unwrap_or(0);
                json!({
                    "copyset": id,
                    "replicas": replicas.iter().map(|r| json!({
                        "node": r.node, "role": r.role, "term": r.term, "commit": r.commit,
                        "applied": r.applied, "leader": r.leader, "voters": r.voters,
                        "lag": leader_applied.saturating_sub(r.applied),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let unreachable: Vec<_> = status
            .unreachable
            .iter()
            .map(|(n, e)| json!({"node": n, "error": e}))
            .collect();
        println!(
            "{}",
            json!({"copysets": copysets, "unreachable": unreachable})
        );
        return;
    }
    for (node, error) in &status.unreachable {
        println!("node {node}: UNREACHABLE ({error})");
    }
    println!(
        "{:>20} {:>5} {:>14} {:>6} {:>8} {:>8} {:>5}",
        "copyset", "node", "role", "term", "commit", "applied", "lag"
    );
    for (copyset, replicas) in &status.copysets {
        let leader_applied = replicas
            .iter()
            .find(|r| r.role == "leader")
            .map(|r| r.applied)
            .unwrap_or(0);
        for r in replicas {
            println!(
                "{:>20} {:>5} {:>14} {:>6} {:>8} {:>8} {:>5}",
                CopysetId(*copyset),
                r.node,
                r.role,
                r.term,
                r.commit,
                r.applied,
                leader_applied.saturating_sub(r.applied)
            );
        }
    }
}

fn main() -> ExitCode {
    ffi::signals::default_sigpipe();
    let cli = Cli::parse();
    let text = match std::fs::read_to_string(&cli.config) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("error: {}: cannot read: {error}", cli.config.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match Config::parse(&cli.config, &text) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The cluster secret claims the admin role; a role key, its own.
    let auth = match Auth::load(&config.auth, Role::Admin) {
        Ok(auth) => auth,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Auth(AuthCommand::DeriveKey { role }) = &cli.command {
        return derive_key(auth.as_ref(), role);
    }
    let nodes = NodeAddress::from_config(&config);
    let net = config.net.clone();
    let outcome = LocalExecutorBuilder::new(Placement::Unbound)
        .name("chunkctl")
        .spawn(move || async move {
            let client_config = ClientConfig {
                deadline: Duration::from_secs(5),
                net,
                auth,
                ..ClientConfig::default()
            };
            let client = Rc::new(Client::new(&nodes, client_config));
            let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
            match cli.command {
                Command::Status => {
                    print_status(&gather(&client, &ids).await, cli.json);
                    Ok(())
                }
                Command::Health { max_lag } => {
                    let status = gather(&client, &ids).await;
                    let found = problems(&status, max_lag);
                    if cli.json {
                        println!(
                            "{}",
                            json!({"healthy": found.is_empty(), "problems": found})
                        );
                    } else if found.is_empty() {
                        println!(
                            "healthy: {} copyset(s) on {} node(s)",
                            status.copysets.len(),
                            ids.len()
                        );
                    } else {
                        for problem in &found {
                            println!("DEGRADED: {problem}");
                        }
                    }
                    if found.is_empty() {
                        Ok(())
                    } else {
                        Err(Failure::from(format!("{} problem(s)", found.len())))
                    }
                }
                // Answered before the executor starts.
                Command::Auth(_) => Ok(()),
                Command::Scrub {
                    copyset,
                    repair,
                    mib_per_s,
                } => scrub_command(&client, &ids, copyset, (repair, mib_per_s), cli.json).await,
                Command::Copyset(CopysetCommand::TransferLeader { id, to }) => {
                    client.set_peers(CopysetId(id), &ids);
                    match client.transfer_leader(CopysetId(id), to).await {
                        Ok(()) => {
                            if cli.json {
                                println!("{}", json!({"copyset": id, "transfer_to": to}));
                            } else {
                                println!(
                                    "copyset {}: leadership transfer to node {to} started",
                                    CopysetId(id)
                                );
                            }
                            Ok(())
                        }
                        Err(error) => Err(Failure::from(error)),
                    }
                }
                Command::Copyset(CopysetCommand::AddPeer {
                    id,
                    node,
                    initial_peers,
                }) => {
                    client.set_peers(CopysetId(id), &ids);
                    client
                        .add_peer(CopysetId(id), node, &initial_peers)
                        .await
                        .map(|membership| print_membership(id, &membership, cli.json))
                        .map_err(Failure::from)
                }
                Command::Copyset(CopysetCommand::RemovePeer { id, node }) => {
                    client.set_peers(CopysetId(id), &ids);
                    client
                        .remove_peer(CopysetId(id), node)
                        .await
                        .map(|membership| print_membership(id, &membership, cli.json))
                        .map_err(Failure::from)
                }
                Command::Copyset(CopysetCommand::ChangePeers {
                    id,
                    peers,
                    initial_peers,
                }) => {
                    let copyset = CopysetId(id);
                    client.set_peers(copyset, &ids);
                    client
                        .set_voters(copyset, &ids, &peers, &initial_peers)
                        .await
                        .map(|membership| print_membership(id, &membership, cli.json))
                        .map_err(Failure::from)
                }
                Command::Copyset(CopysetCommand::Delete { id, node }) => {
                    match client.delete_copyset(CopysetId(id), node).await {
                        Ok(()) => {
                            if cli.json {
                                println!("{}", json!({"copyset": id, "deleted_on": node}));
                            } else {
                                println!(
                                    "copyset {}: replica on node {node} deleted",
                                    CopysetId(id)
                                );
                            }
                            Ok(())
                        }
                        Err(error) => Err(Failure::from(error)),
                    }
                }
                Command::Copyset(CopysetCommand::ResetPeers {
                    id,
                    peers,
                    confirm_data_loss,
                    admin_token_file,
                }) => {
                    let token = dataplane::config::read_admin_token(&admin_token_file)?;
                    for &node in &peers {
                        let reset = client.reset_peers(
                            CopysetId(id),
                            node,
                            &peers,
                            confirm_data_loss,
                            &token,
                        );
                        if let Err(error) = reset.await {
                            return Err(Failure::from(format!("node {node}: {error}")));
                        }
                    }
                    if cli.json {
                        println!("{}", json!({"copyset": id, "voters": peers}));
                    } else {
                        println!(
                            "copyset {}: voters reset to {peers:?} (without consensus)",
                            CopysetId(id)
                        );
                    }
                    Ok(())
                }
                Command::Volume(VolumeCommand::Create {
                    name,
                    size,
                    copyset,
                }) => {
                    let size = match size.parse::<ByteSize>() {
                        Ok(size) => size.bytes(),
                        Err(error) => return Err(Failure::from(format!("--size {size}: {error}"))),
                    };
                    let created =
                        create_volume(&client, &config, &ids, &name, size, copyset).await?;
                    print_volume(&created, cli.json);
                    Ok(())
                }
                Command::Volume(VolumeCommand::Map { name }) => {
                    show_map(&client, &name, cli.json).await
                }
                Command::Volume(VolumeCommand::Snapshot(command)) => {
                    snapshot_command(&client, command, cli.json).await
                }
                Command::Volume(VolumeCommand::Clone { from, name }) => {
                    clone_command(&client, &from, &name, cli.json).await
                }
                Command::Volume(VolumeCommand::Rollback { name, to }) => {
                    let progress = Progress::new("rollback", cli.json);
                    let chunks = volume::snapshot::rollback(&client, &name, &to, &|d, t| {
                        progress.update(d, t)
                    })
                    .await
                    .map_err(Failure::from);
                    progress.finish();
                    let chunks = chunks?;
                    if cli.json {
                        println!(
                            "{}",
                            json!({ "volume": name, "rolled_back_to": to, "chunks": chunks })
                        );
                    } else {
                        println!("volume {name} rolled back to snapshot {to} ({chunks} chunks)");
                    }
                    Ok(())
                }
                Command::Topology => show_topology(&client, cli.json).await,
                Command::Scheduler { action, copyset } => {
                    scheduler(&client, &action, copyset, cli.json).await
                }
                Command::Pool { create } => {
                    show_pool(&client, &config, &ids, create, cli.json).await
                }
                Command::Volume(VolumeCommand::List) => {
                    let volumes = volume::list_volumes(&client).await.map_err(Failure::from)?;
                    if cli.json {
                        let list: Vec<serde_json::Value> =
                            volumes.iter().map(volume_json).collect();
                        println!("{}", json!({ "volumes": list }));
                    } else {
                        println!(
                            "{:<24} {:>14} {:>8} {:>8}",
                            "volume", "bytes", "copyset", "chunks"
                        );
                        for v in &volumes {
                            let place = match v.layout {
                                VolumeLayout::Single { copyset, .. } => copyset.0.to_string(),
                                VolumeLayout::Striped { .. } => "striped".to_string(),
                            };
                            println!(
                                "{:<24} {:>14} {:>8} {:>8}",
                                v.name,
                                v.size,
                                place,
                                v.chunks()
                            );
                        }
                    }
                    Ok(())
                }
                Command::Volume(VolumeCommand::Info { name }) => {
                    let found = volume::find_volume(&client, &name)
                        .await
                        .map_err(Failure::from)?;
                    print_volume(&found, cli.json);
                    Ok(())
                }
                Command::Volume(VolumeCommand::Delete { name }) => {
                    let deleted = volume::delete_volume(&client, &name)
                        .await
                        .map_err(Failure::from)?;
                    if cli.json {
                        println!("{}", json!({ "deleted": deleted.name }));
                    } else {
                        println!("volume {} deleted", deleted.name);
                    }
                    Ok(())
                }
                Command::Copyset(CopysetCommand::Create { id, peers }) => {
                    match client.create_copyset(CopysetId(id), &peers).await {
                        Ok(()) => {
                            if cli.json {
                                println!("{}", json!({"created": id, "peers": peers}));
                            } else {
                                println!("copyset {} created on nodes {peers:?}", CopysetId(id));
                            }
                            Ok(())
                        }
                        Err(error) => Err(Failure::from(error)),
                    }
                }
            }
        })
        .map_err(|e| Failure::from(e.to_string()))
        .and_then(|handle| {
            handle
                .join()
                .map_err(|_| Failure::from("chunkctl's executor panicked".to_string()))
        })
        .and_then(|r| r);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.message);
            ExitCode::from(error.code)
        }
    }
}
