//! The fault suite: three real `chunkserver run` processes (each in its own network namespace
//! where the host allows it), a recorded client workload, and a seeded schedule of faults —
//! SIGKILL and restart, SIGSTOP/SIGCONT, partitions, disk faults (errors, a full device, power
//! cuts that lose, keep or tear unflushed writes), clock jumps and shifted clocks. Afterwards: the history must be
//! linearizable per register, every acknowledged write-once page must read back, the cluster
//! must recover (a leader, equal applied indexes) within a bound, and no process may have
//! exited or panicked unasked. A report names operations, faults, unavailability windows and
//! the verdict; a failing run names its seed and how to replay it.

pub mod bulk;
pub mod checker;
pub mod network;
pub mod nodes;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::common::{free_ports, write_config_on_hosts};
use checker::{Op, OpKind, Outcome};
use network::Network;
use nodes::Nodes;
use workload::{OnceWrite, Record, COPYSET, ONCE_TAG, PAGE, REGISTERS};

/// After the last fault the cluster must be healthy again within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// The workload keeps running this long after the last fault healed.
const CALM_AFTER_FAULTS: Duration = Duration::from_secs(4);
/// A stretch this long without any successful operation counts as unavailability.
const UNAVAILABLE_GAP_US: u64 = 1_000_000;

/// The sizes a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Small WALs (16 MiB) and chunks (1 MiB), one data copyset: checkpoints, compactions
    /// and snapshot installs every few seconds.
    Small,
    /// The sizes users run (issue 17): 256 MiB WALs, 16 MiB chunks, four more data copysets
    /// with a volume each besides the register copyset and the metadata copyset, more than
    /// four WALs' worth written by fio through `chunkserver nbd` before the faults and during
    /// them (with `verify=crc32c`), and a liveness check of every copyset at the end.
    Realistic,
}

impl Profile {
    fn wal_size(self) -> &'static str {
        match self {
            Profile::Small => "16MiB",
            Profile::Realistic => "256MiB",
        }
    }

    fn device_size(self) -> &'static str {
        match self {
            Profile::Small => "640MiB",
            Profile::Realistic => "3GiB",
        }
    }

    fn chunk_size(self) -> &'static str {
        match self {
            Profile::Small => "1MiB",
            Profile::Realistic => "16MiB",
        }
    }
}

/// After the last fault (and the workloads' end), every copyset of the realistic profile must
/// have one leader and equal applied indexes within this.
const LIVENESS_BOUND: Duration = Duration::from_secs(10);

/// How long to inject faults and from which seed.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub seconds: u64,
    pub seed: u64,
    /// The sizes (`FAULT_PROFILE=small|realistic`).
    pub profile: Profile,
    /// Writes the workload issues at most (0: no limit); see [`DEFAULT_WRITE_BUDGET`].
    pub write_budget: u64,
    /// Concurrent writers per register.
    pub writers: usize,
}

/// No cap on writes by default (0); `FAULT_WRITE_BUDGET=N` stops the writers after N writes.
pub const DEFAULT_WRITE_BUDGET: u64 = 0;

impl Settings {
    /// `FAULT_SECONDS` and `FAULT_SEED` from the environment, else the given defaults.
    pub fn from_env(seconds: u64, seed: u64) -> Settings {
        let read = |name: &str, default: u64| match std::env::var(name) {
            Ok(text) => text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
            Err(_) => default,
        };
        Settings {
            seconds: read("FAULT_SECONDS", seconds),
            seed: read("FAULT_SEED", seed),
            profile: match std::env::var("FAULT_PROFILE").as_deref() {
                Ok("realistic") => Profile::Realistic,
                _ => Profile::Small,
            },
            write_budget: read("FAULT_WRITE_BUDGET", DEFAULT_WRITE_BUDGET),
            writers: read("FAULT_WRITERS", 1).max(1) as usize,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    /// SIGKILL a random node, restart it after a while.
    KillRestart,
    /// SIGKILL the node the client last saw leading, restart it after a while.
    KillLeader,
    /// SIGSTOP a random node, SIGCONT after a while.
    Pause,
    /// SIGSTOP the leader, SIGCONT after a while.
    PauseLeader,
    /// One node cut off from both others (minority of one, majority of two).
    IsolateNode,
    /// The leader cut off from both others.
    IsolateLeader,
    /// Two nodes cut off from each other; the third still reaches both.
    BridgeNode,
    /// Everything one node sends another is dropped; the other direction still flows.
    OneWay,
    /// A random node's device fails 1% of reads and 0.5% of writes and flushes; a write that
    /// fails may land torn. The node stops on the first failure under a copyset (exit 3) and
    /// is restarted when the fault ends.
    DiskErrors,
    /// A random node's device is full: writes fail with ENOSPC. Same course as above.
    DiskFull,
    /// The power of a random node, or of the leader, goes: unflushed writes are lost, kept or
    /// torn, the process ends (exit 4); it is restarted after a while.
    PowerCut,
    /// The host's wall clock jumps forward or back by up to 2 s, and back again after a while.
    ClockJump,
    /// A random node restarts with its monotonic and boot clocks hours or days off.
    ClockShift,
}

impl FaultKind {
    fn needs_clock(self) -> bool {
        self == FaultKind::ClockJump
    }

    fn needs_time_namespace(self) -> bool {
        self == FaultKind::ClockShift
    }

    fn needs_network(self) -> bool {
        matches!(
            self,
            FaultKind::IsolateNode
                | FaultKind::IsolateLeader
                | FaultKind::BridgeNode
                | FaultKind::OneWay
        )
    }
}

const KINDS: [FaultKind; 13] = [
    FaultKind::KillRestart,
    FaultKind::KillLeader,
    FaultKind::Pause,
    FaultKind::PauseLeader,
    FaultKind::IsolateNode,
    FaultKind::IsolateLeader,
    FaultKind::BridgeNode,
    FaultKind::OneWay,
    FaultKind::DiskErrors,
    FaultKind::DiskFull,
    FaultKind::PowerCut,
    FaultKind::ClockJump,
    FaultKind::ClockShift,
];

/// Exit status of a node whose device failed (`dataplane::server::EXIT_DEVICE_FAILED`).
const EXIT_DEVICE_FAILED: i32 = dataplane::server::EXIT_DEVICE_FAILED;
/// Exit status of a node whose power was cut (`dataplane::storage::bdev::inject::EXIT_POWER_CUT`).
const EXIT_POWER_CUT: i32 = dataplane::storage::bdev::inject::EXIT_POWER_CUT;

/// Sets the host's wall clock `delta_ms` away from where it is (`date -s`).
fn jump_clock(delta_ms: i64) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64;
    let target = now + delta_ms;
    let output = std::process::Command::new("date")
        .args([
            "-u",
            "-s",
            &format!("@{}.{:03}", target / 1000, target % 1000),
        ])
        .output()
        .map_err(|e| format!("cannot run date: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "date -s failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Whether this host lets the suite set its wall clock, or why not.
fn clock_settable() -> Result<(), String> {
    if std::env::var_os("FAULT_NO_CLOCK").is_some() {
        return Err("FAULT_NO_CLOCK is set".into());
    }
    jump_clock(0)
}

/// Whether `unshare --time` works here, or why not.
fn time_namespaces() -> Result<(), String> {
    let status = std::process::Command::new("unshare")
        .args([
            "--time",
            "--monotonic",
            "3600",
            "--boottime",
            "3600",
            "true",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("unshare --time failed: {status}"))
    }
}

/// The system's uptime in whole seconds (how far back a monotonic clock can be shifted).
fn uptime_seconds() -> i64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

#[derive(Debug)]
struct FaultEvent {
    kind: FaultKind,
    what: String,
    start_us: u64,
    end_us: u64,
}

fn micros(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

/// Sleeps `duration` in steps, restarting nodes that exit unasked meanwhile.
fn hold(nodes: &mut Nodes, duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        nodes.reap_unexpected();
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
}

/// Injects one fault, holds it, undoes it.
fn inject(
    kind: FaultKind,
    rng: &mut SmallRng,
    nodes: &mut Nodes,
    network: &mut Option<Network>,
    leader: u64,
) -> Result<String, String> {
    let count = nodes.count();
    let random = rng.gen_range(0..count);
    let target = match kind {
        FaultKind::KillLeader
        | FaultKind::PauseLeader
        | FaultKind::IsolateLeader
        | FaultKind::PowerCut
            if (1..=count as u64).contains(&leader) =>
        {
            leader as usize - 1
        }
        _ => random,
    };
    let duration = Duration::from_millis(rng.gen_range(300..3000));
    let what = match kind {
        FaultKind::KillRestart | FaultKind::KillLeader => {
            nodes.kill(target);
            hold(nodes, duration);
            nodes.restart(target);
            format!("kill -9 node {}, down {duration:?}", target + 1)
        }
        FaultKind::Pause | FaultKind::PauseLeader => {
            nodes.pause(target)?;
            hold(nodes, duration);
            nodes.resume(target)?;
            format!("SIGSTOP node {} for {duration:?}", target + 1)
        }
        FaultKind::DiskErrors | FaultKind::DiskFull => {
            let (query, name) = if kind == FaultKind::DiskErrors {
                (
                    "disk=errors&read=10000&write=5000",
                    "disk errors (1% of reads, 0.5% of writes)",
                )
            } else {
                ("disk=full", "a full disk")
            };
            nodes.disk_fault(target, query, Some(EXIT_DEVICE_FAILED))?;
            hold(nodes, duration);
            let outcome = nodes.disk_fault_end(target)?;
            format!("{name} on node {} for {duration:?}: {outcome}", target + 1)
        }
        FaultKind::PowerCut => {
            let target = if rng.gen_bool(0.5) { target } else { random };
            let what = nodes.disk_fault(target, "disk=power-cut", Some(EXIT_POWER_CUT))?;
            if !nodes.wait_fault_exit(target, Duration::from_secs(10)) {
                return Err(format!(
                    "node {} still runs after its power cut",
                    target + 1
                ));
            }
            hold(nodes, duration);
            nodes.restart(target);
            format!(
                "power cut on node {}, down {duration:?} ({what})",
                target + 1
            )
        }
        FaultKind::ClockJump => {
            let magnitude = rng.gen_range(100..2000i64);
            let delta = if rng.gen_bool(0.5) {
                magnitude
            } else {
                -magnitude
            };
            jump_clock(delta)?;
            hold(nodes, duration);
            jump_clock(-delta)?;
            format!("wall clock jumped {delta} ms and back after {duration:?}")
        }
        FaultKind::ClockShift => {
            // Forward by up to 30 days, or back by up to the uptime less ten minutes.
            let back = (uptime_seconds() - 600).max(0);
            let shift = if back > 3600 && rng.gen_bool(0.5) {
                -rng.gen_range(3600..=back)
            } else {
                rng.gen_range(3600..30 * 86_400)
            };
            nodes.restart_clock_shifted(target, shift);
            hold(nodes, duration);
            format!(
                "node {} restarted with its monotonic clock {shift} s off",
                target + 1
            )
        }
        FaultKind::IsolateNode | FaultKind::IsolateLeader => {
            let net = network.as_mut().ok_or("no network")?;
            for other in (0..count).filter(|&o| o != target) {
                net.cut(target, other)?;
                net.cut(other, target)?;
            }
            hold(nodes, duration);
            net.heal()?;
            format!("node {} isolated for {duration:?}", target + 1)
        }
        FaultKind::BridgeNode => {
            let net = network.as_mut().ok_or("no network")?;
            let (a, b) = ((target + 1) % count, (target + 2) % count);
            net.cut(a, b)?;
            net.cut(b, a)?;
            hold(nodes, duration);
            net.heal()?;
            format!(
                "nodes {} and {} cut apart, node {} bridges, for {duration:?}",
                a + 1,
                b + 1,
                target + 1
            )
        }
        FaultKind::OneWay => {
            let net = network.as_mut().ok_or("no network")?;
            let to = (target + rng.gen_range(1..count)) % count;
            net.cut(target, to)?;
            hold(nodes, duration);
            net.heal()?;
            format!(
                "node {} to node {} dropped (one way) for {duration:?}",
                target + 1,
                to + 1
            )
        }
    };
    Ok(what)
}

/// Runs `body` with a fresh client on its own executor.
fn with_client<T: Send + 'static>(
    addresses: Vec<dataplane::client::NodeAddress>,
    deadline: Duration,
    body: impl FnOnce(dataplane::client::Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("fault-checker")
        .spawn(move || async move { body(workload::client(&addresses, deadline)).await })
        .expect("client executor")
        .join()
        .expect("client thread")
}

/// What the final phase found.
struct Final {
    /// Time from the last fault's end to a healthy cluster, if it got there.
    recovered_after: Option<Duration>,
    last_status: String,
    final_reads: Vec<Op>,
    lost: Vec<String>,
}

/// Waits for one leader and equal applied indexes, then reads every register and every
/// written write-once page.
fn final_phase(
    addresses: Vec<dataplane::client::NodeAddress>,
    base: Instant,
    faults_ended: Instant,
    once: Vec<OnceWrite>,
) -> Final {
    with_client(addresses, Duration::from_secs(10), move |client| {
        Box::pin(async move {
            let mut recovered_after = None;
            let mut last_status = String::new();
            // At least one look, even when the workloads' end (a round of fio finishing in a
            // debug build) already took the bound: the loop used to end before looking, and
            // reported "not recovered" with no status at all.
            let mut first = true;
            while first || faults_ended.elapsed() < RECOVERY_BOUND {
                first = false;
                let mut statuses = Vec::new();
                for node in 1..=3u64 {
                    statuses.push(client.copyset_status(node, COPYSET).await);
                }
                last_status = format!("{statuses:?}");
                let all: Vec<_> = statuses.iter().filter_map(|s| s.as_ref().ok()).collect();
                if all.len() == 3 {
                    let leaders = all.iter().filter(|s| s.role == 3).count();
                    let applied = all[0].applied;
                    let agreed = all
                        .iter()
                        .all(|s| s.applied == applied && s.commit == all[0].commit);
                    let leader_known = all
                        .iter()
                        .all(|s| s.leader != 0 && s.leader == all[0].leader);
                    if leaders == 1 && agreed && leader_known && applied > 0 {
                        recovered_after = Some(faults_ended.elapsed());
                        break;
                    }
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            let ops = std::cell::RefCell::new(Vec::new());
            for register in 0..REGISTERS {
                workload::read_register(&client, base, &ops, register).await;
            }
            let mut lost = Vec::new();
            for write in &once {
                let (chunk, offset) = workload::once_location(write.page);
                let read = client
                    .read(COPYSET, chunk, u64::from(offset), PAGE as u32)
                    .await;
                let seen = match &read {
                    Ok(data) => workload::decode(ONCE_TAG, data),
                    Err(e) => Err(e.to_string()),
                };
                let fine = match (write.outcome, &seen) {
                    (Outcome::Ok(_), Ok(Some(v))) => *v == write.value,
                    (Outcome::Ok(_), _) => false,
                    (_, Ok(Some(v))) => *v == write.value,
                    (_, Ok(None)) => true,
                    // A page whose write never happened may be in a chunk never created.
                    (_, Err(_)) => read.is_err(),
                };
                if !fine && lost.len() < 3 {
                    // What each replica holds of the page's chunk (GET_CHUNK_INFO: size, sn,
                    // snapshot, corrected sn; or why not), for the post-mortem.
                    let body = bytes::Bytes::copy_from_slice(&chunk.0.to_le_bytes());
                    for node in 1..=3u64 {
                        let info = client
                            .call_node(
                                node,
                                COPYSET,
                                dataplane::protocol::GET_CHUNK_INFO,
                                body.clone(),
                            )
                            .await;
                        let status = client.copyset_status(node, COPYSET).await;
                        lost.push(format!(
                            "  node {node}: chunk {} info {info:?}; copyset {status:?}",
                            chunk.0
                        ));
                    }
                }
                if !fine {
                    lost.push(format!(
                        "write-once page {} (value {}, {:?}) reads back as {seen:?}",
                        write.page, write.value, write.outcome
                    ));
                }
            }
            Final {
                recovered_after,
                last_status,
                final_reads: ops.take(),
                lost,
            }
        })
    })
}

/// Whether fio is on this host.
fn fio_installed() -> bool {
    std::process::Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Node 1's configuration file (its `[cluster]` names every node).
fn configs_dir(dir: &std::path::Path) -> PathBuf {
    dir.join("node1.toml")
}

/// Waits until each of `copysets` has exactly one leader, known to all three replicas, and
/// equal applied indexes; returns how long that took, or what was still wrong after
/// [`LIVENESS_BOUND`].
fn every_copyset_led(
    addresses: Vec<dataplane::client::NodeAddress>,
    copysets: Vec<dataplane::ids::CopysetId>,
) -> Result<Duration, String> {
    with_client(addresses, Duration::from_secs(2), move |client| {
        Box::pin(async move {
            let began = Instant::now();
            loop {
                let mut wrong = Vec::new();
                for copyset in &copysets {
                    let mut statuses = Vec::new();
                    for node in 1..=3u64 {
                        match client.copyset_status(node, *copyset).await {
                            Ok(status) => statuses.push(status),
                            Err(e) => wrong.push(format!("copyset {copyset} on node {node}: {e}")),
                        }
                    }
                    let leaders = statuses.iter().filter(|s| s.role == 3).count();
                    let agreed = statuses.len() == 3
                        && statuses.iter().all(|s| {
                            s.applied == statuses[0].applied
                                && s.leader != 0
                                && s.leader == statuses[0].leader
                        });
                    if leaders != 1 || !agreed {
                        let seen: Vec<String> = statuses
                            .iter()
                            .map(|s| {
                                format!("role {} leader {} applied {}", s.role, s.leader, s.applied)
                            })
                            .collect();
                        wrong.push(format!("copyset {copyset}: {seen:?}"));
                    }
                }
                if wrong.is_empty() {
                    return Ok(began.elapsed());
                }
                if began.elapsed() > LIVENESS_BOUND {
                    return Err(format!("not led after {LIVENESS_BOUND:?}: {wrong:?}"));
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        })
    })
}

/// Stretches without a successful operation, as (start, end) in microseconds.
fn unavailability(record: &Record, from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut ends: Vec<u64> = record
        .ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Ok(_)))
        .map(|op| op.end)
        .filter(|&end| end >= from && end <= to)
        .collect();
    ends.sort_unstable();
    let mut windows = Vec::new();
    let mut previous = from;
    for end in ends.into_iter().chain(std::iter::once(to)) {
        if end.saturating_sub(previous) > UNAVAILABLE_GAP_US {
            windows.push((previous, end));
        }
        previous = previous.max(end);
    }
    windows
}

/// One run at a time per process: runs share the network namespaces' names (made from the
/// process id), the host's wall clock and the machine's two cores.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the whole suite; panics with the report's verdict when anything failed.
pub fn run(settings: Settings) {
    let _one = ONE_RUN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Settings {
        seconds,
        seed,
        profile,
        write_budget,
        writers,
    } = settings;
    let realistic = profile == Profile::Realistic;
    let replay = format!(
        "replay: FAULT_WRITE_BUDGET={write_budget} FAULT_WRITERS={writers} \
         scripts/fault-suite {}{seconds} {seed}",
        if realistic {
            "--profile realistic "
        } else {
            ""
        }
    );
    println!(
        "fault suite: seed {seed}, {seconds} s of faults, {profile:?} profile (WAL {}, chunks \
         {}), write budget {write_budget} ({replay})",
        profile.wal_size(),
        profile.chunk_size()
    );
    if realistic && !fio_installed() {
        println!("SKIPPED realistic profile: fio is not installed (Debian package fio)");
        return;
    }

    let mut network = match Network::create(3) {
        Ok(network) => Some(network),
        Err(reason) => {
            println!("SKIPPED partitions: {reason}; nodes run on loopback");
            None
        }
    };
    let hosts: Vec<String> = match &network {
        Some(net) => net.hosts.clone(),
        None => vec!["127.0.0.1".to_string(); 3],
    };
    let temporary = tempfile::tempdir().expect("temporary directory");
    // With FAULT_KEEP_DIR the node logs and device images stay for a post-mortem (the
    // directory is then not removed, whatever the verdict).
    let (dir, _removed_on_drop) = if std::env::var_os("FAULT_KEEP_DIR").is_some() {
        let kept = temporary.keep();
        println!("FAULT_KEEP_DIR: the run's files stay in {}", kept.display());
        (kept, None)
    } else {
        (temporary.path().to_path_buf(), Some(temporary))
    };
    let ports = free_ports(10);
    // Each node also serves its metrics endpoint, where the suite arms disk faults.
    let control: Vec<String> = (0..3)
        .map(|i| format!("{}:{}", hosts[i], ports[6 + i]))
        .collect();
    let configs: Vec<PathBuf> = (1..=3)
        .map(|id| {
            let path = write_config_on_hosts(
                dir.as_path(),
                id,
                &hosts,
                &ports,
                profile.device_size(),
                profile.wal_size(),
            );
            let mut text = std::fs::read_to_string(&path)
                .expect("read config")
                .replace(
                    "chunk_size = \"1MiB\"",
                    &format!("chunk_size = \"{}\"", profile.chunk_size()),
                );
            text.push_str(&format!(
                "\n[metrics]\naddress = \"{}\"\n\n[fault]\ninjection = true\nseed = {}\n",
                control[id - 1],
                seed.wrapping_add(id as u64)
            ));
            std::fs::write(&path, text).expect("write config");
            path
        })
        .collect();
    let prefixes = (0..3)
        .map(|i| {
            network
                .as_ref()
                .map(|n| n.exec_prefix(i))
                .unwrap_or_default()
        })
        .collect();
    let mut nodes = Nodes::start(configs, dir.as_path(), prefixes);
    nodes.set_control(control);
    let addresses = workload::addresses(&hosts, &ports);

    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let workload = {
        let (addresses, stop, leader, completed) = (
            addresses.clone(),
            Arc::clone(&stop),
            Arc::clone(&leader),
            Arc::clone(&completed),
        );
        LocalExecutorBuilder::new(Placement::Unbound)
            .name("fault-workload")
            .spawn(move || {
                let controls = workload::Controls {
                    stop,
                    leader,
                    completed,
                    write_budget,
                    writers,
                    ready: ready_tx,
                };
                workload::run(addresses, base, controls)
            })
            .expect("workload executor")
    };
    if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
        stop.store(true, Ordering::Relaxed);
        let tails: Vec<String> = (0..3).map(|i| nodes.log_tail(i, 20)).collect();
        panic!("the cluster did not take the first writes within 60 s; logs: {tails:#?}\n{replay}");
    }

    // The realistic profile's bulk data: filled before the faults, written during them.
    let bulk_stop = Arc::new(AtomicBool::new(false));
    let mut bulk_before = bulk::Written::default();
    let mut bulk_filled_in = Duration::ZERO;
    let bulk = if realistic {
        let bulk = match bulk::Bulk::start(&configs_dir(dir.as_path()), dir.as_path(), ports[9]) {
            Ok(bulk) => Arc::new(bulk),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                panic!("the bulk export did not start: {e}\n{replay}");
            }
        };
        let began = Instant::now();
        bulk_before = bulk.fill();
        bulk_filled_in = began.elapsed();
        println!(
            "bulk fill: {} MiB written by fio through chunkserver nbd in {:.1} s{}",
            bulk_before.bytes >> 20,
            bulk_filled_in.as_secs_f64(),
            if bulk_before.failures.is_empty() {
                String::new()
            } else {
                format!("; FAILED: {:?}", bulk_before.failures)
            }
        );
        Some(bulk)
    } else {
        None
    };
    let bulk_during = bulk.as_ref().map(|b| b.during(Arc::clone(&bulk_stop)));

    // The schedule.
    let mut rng = SmallRng::seed_from_u64(seed);
    let clock = clock_settable();
    let time_namespaces = time_namespaces();
    if let Err(reason) = &clock {
        println!("SKIPPED clock jumps: {reason}");
    }
    if let Err(reason) = &time_namespaces {
        println!("SKIPPED shifted clocks: {reason}");
    }
    let kinds: Vec<FaultKind> = KINDS
        .iter()
        .copied()
        .filter(|k| network.is_some() || !k.needs_network())
        .filter(|k| clock.is_ok() || !k.needs_clock())
        .filter(|k| time_namespaces.is_ok() || !k.needs_time_namespace())
        .collect();
    let mut events: Vec<FaultEvent> = Vec::new();
    let mut injection_errors = Vec::new();
    let faults_start = micros(base);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut next_progress = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(60);
            println!(
                "  {:.0} s: {} faults injected, {} operations completed",
                base.elapsed().as_secs_f64(),
                events.len(),
                completed.load(Ordering::Relaxed)
            );
        }
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let start_us = micros(base);
        match inject(
            kind,
            &mut rng,
            &mut nodes,
            &mut network,
            leader.load(Ordering::Relaxed),
        ) {
            Ok(what) => events.push(FaultEvent {
                kind,
                what,
                start_us,
                end_us: micros(base),
            }),
            Err(e) => injection_errors.push(format!("{kind:?}: {e}")),
        }
        let gap = Duration::from_millis(rng.gen_range(200..1500));
        hold(&mut nodes, gap);
    }
    if let Some(net) = network.as_mut() {
        if let Err(e) = net.heal() {
            injection_errors.push(format!("heal: {e}"));
        }
    }
    nodes.restore_all();
    let faults_ended = Instant::now();
    let faults_end = micros(base);
    hold(&mut nodes, CALM_AFTER_FAULTS);
    stop.store(true, Ordering::Relaxed);
    bulk_stop.store(true, Ordering::Relaxed);
    let mut record = workload.join().expect("workload thread");
    let workload_end = micros(base);
    // The round of fio under way finishes (fio bounds its own runs).
    let bulk_written = bulk_during
        .map(|during| during.join().expect("bulk thread"))
        .unwrap_or_default();
    nodes.reap_unexpected();
    // Liveness: with every workload stopped, every copyset has one leader again and its
    // replicas agree, within LIVENESS_BOUND.
    let liveness = realistic.then(|| {
        let mut copysets = vec![COPYSET, dataplane::volume_table::METADATA_COPYSET];
        copysets.extend(bulk::copysets());
        every_copyset_led(addresses.clone(), copysets)
    });

    let once = std::mem::take(&mut record.once);
    let once_count = once.len();
    let once_acked = once
        .iter()
        .filter(|w| matches!(w.outcome, Outcome::Ok(_)))
        .count();
    let last = final_phase(addresses, base, faults_ended, once);
    record.ops.extend(last.final_reads.iter().copied());
    nodes.reap_unexpected();

    // Checks.
    let mut failures: Vec<String> = Vec::new();
    for (register, verdict) in checker::check_all(&record.ops) {
        if let Err(why) = verdict {
            failures.push(format!("register {register}: {why}"));
        }
    }
    for op in &last.final_reads {
        if !matches!(op.outcome, Outcome::Ok(_)) {
            failures.push(format!(
                "final read of register {} failed: {op:?}",
                op.register
            ));
        }
    }
    failures.extend(last.lost.iter().take(20).cloned());
    if last.lost.len() > 20 {
        failures.push(format!("… {} lost pages in all", last.lost.len()));
    }
    if last.recovered_after.is_none() {
        failures.push(format!(
            "no recovery within {RECOVERY_BOUND:?} of the last fault: {}",
            last.last_status
        ));
    }
    if let Some(Err(why)) = &liveness {
        failures.push(format!("liveness: {why}"));
    }
    failures.extend(
        bulk_before
            .failures
            .iter()
            .map(|f| format!("bulk fill: {f}")),
    );
    failures.extend(
        bulk_written
            .failures
            .iter()
            .map(|f| format!("bulk during faults: {f}")),
    );
    for (index, status) in &nodes.unexpected_exits {
        failures.push(format!("node {} exited unasked: {status}", index + 1));
    }
    failures.extend(nodes.panics());
    failures.extend(injection_errors.iter().cloned());
    failures.extend(nodes.stop_all(Duration::from_secs(20)));

    // The report.
    let count = |f: &dyn Fn(&Op) -> bool| record.ops.iter().filter(|op| f(op)).count();
    let skipped = |probe: &Result<(), String>| match probe {
        Ok(()) => "on".to_string(),
        Err(reason) => format!("SKIPPED ({reason})"),
    };
    let is_write = |op: &Op| matches!(op.kind, OpKind::Write(_));
    println!("---- fault suite report (seed {seed}) ----");
    println!(
        "partitions: {}",
        if network.is_some() {
            "network namespaces"
        } else {
            "SKIPPED (loopback)"
        }
    );
    println!(
        "clock jumps: {}; shifted clocks: {}",
        skipped(&clock),
        skipped(&time_namespaces)
    );
    println!(
        "operations: {} register ops ({} writes: {} ok, {} unknown, {} failed; {} reads: {} ok, {} failed), \
         {once_count} write-once writes ({once_acked} acknowledged)",
        record.ops.len(),
        count(&|op| is_write(op)),
        count(&|op| is_write(op) && matches!(op.outcome, Outcome::Ok(_))),
        count(&|op| is_write(op) && op.outcome == Outcome::Unknown),
        count(&|op| is_write(op) && op.outcome == Outcome::Failed),
        count(&|op| !is_write(op)),
        count(&|op| !is_write(op) && matches!(op.outcome, Outcome::Ok(_))),
        count(&|op| !is_write(op) && !matches!(op.outcome, Outcome::Ok(_))),
    );
    let mut by_kind: BTreeMap<FaultKind, (usize, u64)> = BTreeMap::new();
    for event in &events {
        let entry = by_kind.entry(event.kind).or_default();
        entry.0 += 1;
        entry.1 += event.end_us - event.start_us;
    }
    if let Some(at) = record.budget_reached_us {
        println!(
            "write budget of {write_budget} writes reached at {:.1} s; reads only from then on",
            at as f64 / 1e6
        );
    }
    if realistic {
        println!(
            "bulk data (fio through chunkserver nbd): {} MiB before the faults ({:.1} s), {} MiB \
             during them in {} fio runs ({} MiB read back and verified with crc32c), {} failed \
             runs; the WAL is {} a node",
            bulk_before.bytes >> 20,
            bulk_filled_in.as_secs_f64(),
            bulk_written.bytes >> 20,
            bulk_written.runs,
            bulk_written.verified_bytes >> 20,
            bulk_written.failures.len(),
            profile.wal_size()
        );
        match &liveness {
            Some(Ok(after)) => println!(
                "liveness: every copyset (6) led, applied indexes equal, {:.1} s after the \
                 workloads stopped",
                after.as_secs_f64()
            ),
            Some(Err(why)) => println!("liveness: FAILED: {why}"),
            None => {}
        }
    }
    println!("faults: {} in {seconds} s", events.len());
    let exits = |code: i32| nodes.fault_exits.iter().filter(|(_, c)| *c == code).count();
    println!(
        "exits caused by faults: {} on a failed device (exit {EXIT_DEVICE_FAILED}), {} power cuts (exit {EXIT_POWER_CUT})",
        exits(EXIT_DEVICE_FAILED),
        exits(EXIT_POWER_CUT)
    );
    for (kind, (n, us)) in &by_kind {
        println!("    {kind:?}: {n} ({:.1} s in all)", *us as f64 / 1e6);
    }
    let windows = unavailability(&record, faults_start, workload_end);
    let total: u64 = windows.iter().map(|(a, b)| b - a).sum();
    let longest = windows.iter().map(|(a, b)| b - a).max().unwrap_or(0);
    println!(
        "unavailability (no successful op for > {} ms): {} windows, {:.1} s in all, longest {:.1} s",
        UNAVAILABLE_GAP_US / 1000,
        windows.len(),
        total as f64 / 1e6,
        longest as f64 / 1e6
    );
    for (a, b) in windows.iter().take(12) {
        let during: Vec<&str> = events
            .iter()
            .filter(|e| e.start_us <= *b && e.end_us + UNAVAILABLE_GAP_US >= *a)
            .map(|e| e.what.as_str())
            .collect();
        println!(
            "    {:.1}..{:.1} s: {}",
            *a as f64 / 1e6,
            *b as f64 / 1e6,
            during.join("; ")
        );
    }
    println!(
        "after faults ended at {:.1} s: {}",
        faults_end as f64 / 1e6,
        match last.recovered_after {
            Some(d) => format!(
                "one leader and equal applied indexes {:.1} s later (the workload ran on \
                 for the first {:.0} s of that)",
                d.as_secs_f64(),
                CALM_AFTER_FAULTS.as_secs_f64()
            ),
            None => "NOT recovered".to_string(),
        }
    );
    if failures.is_empty() {
        println!("verdict: PASS (linearizable, nothing lost, recovered, no unasked exits)");
    } else {
        println!("verdict: FAIL");
        for failure in &failures {
            println!("    {failure}");
        }
        for index in 0..3 {
            println!(
                "node {} log tail:\n{}",
                index + 1,
                nodes.log_tail(index, 15)
            );
        }
        panic!(
            "fault suite failed with seed {seed}: {} problem(s); {replay}",
            failures.len()
        );
    }
    drop(nodes);
    drop(network);
}
