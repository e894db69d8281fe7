//! Issue 19's recovery with real processes: four `chunkserver run` (one shard each, on
//! 127.0.0.1 to .4 so that placement sees four hosts; 16 MiB chunks, 256 MiB WAL rings;
//! heartbeats every 200 ms, offline after 3 s), a 1 GiB volume striped over the pool, and
//! unmodified fio (`--ioengine=nbd`, `verify=crc32c`) writing it through `chunkserver nbd`.
//! While fio runs, node 4 gets SIGKILL for good: within a bound (printed) every pool copyset
//! has three voters again, none of them node 4, fio ends without an error, every block
//! verified, and then every voter is within 1000 entries of its leader. Then node 4 comes
//! back with its old replicas: it leads none of the copysets it was removed from, the
//! placement service has it delete them, and fio reads everything back unchanged. A second
//! test kills the placement service's leader in the middle of such a recovery.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    chunkctl, free_ports, start, text, wait_for_port, write_config_sized, Cluster, Sizes,
};

fn json(config: &std::path::Path, args: &[&str]) -> Option<serde_json::Value> {
    let output = chunkctl(config, args);
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// The pool's copysets and their voters.
fn pool(config: &std::path::Path) -> Vec<(u64, BTreeSet<u64>)> {
    let Some(pool) = json(config, &["--json", "pool"]) else {
        return Vec::new();
    };
    pool["pool"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    let peers = c["peers"]
                        .as_array()
                        .map(|p| p.iter().filter_map(serde_json::Value::as_u64).collect())
                        .unwrap_or_default();
                    (c["copyset"].as_u64().unwrap_or(0), peers)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// fio's verified random writes over the first 64 MiB of the volume (or, with
/// `--verify_only`, the check of what the same job wrote).
fn fio(uri: &str, extra: &[&str]) -> Command {
    let mut command = Command::new("fio");
    command
        .args([
            "--name=recovery",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=64m",
            "--randseed=19",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Four nodes, the metadata copyset on nodes 1 to 3, a 1 GiB striped volume `v` exported by
/// `chunkserver nbd` (a child of the cluster), and the pool copysets with a voter on node 4.
struct Setup {
    _dir: tempfile::TempDir,
    configs: Vec<std::path::PathBuf>,
    cluster: Cluster,
    uri: String,
    on_lost: Vec<u64>,
}

/// Starts the cluster of [`Setup`], `placement` added to each node's `[placement]` (none when
/// fio is missing: the test is skipped).
fn four_nodes_and_an_export(placement: &str) -> Option<Setup> {
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIPPED: fio is not installed (Debian package fio)");
        return None;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(9);
    let hosts: Vec<String> = (1..=4).map(|n| format!("127.0.0.{n}")).collect();
    let sizes = Sizes {
        device: "4GiB",
        wal: "256MiB",
        chunk: "16MiB",
    };
    let configs: Vec<_> = (1..=4)
        .map(|id| {
            let path = write_config_sized(dir.path(), id, &hosts, &ports, &sizes, 1);
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("config");
            writeln!(
                file,
                "\n[placement]\nheartbeat_ms = 200\noffline_after_ms = 3000\ncopysets_per_node = 3\n{placement}"
            )
            .expect("append");
            path
        })
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    // Wait until the placement service hears all four, then create the volume over them.
    let started = Instant::now();
    loop {
        // The metadata copyset (where the placement service lives), on nodes 1 to 3.
        let meta = dataplane::volume_table::METADATA_COPYSET.0.to_string();
        let _ = chunkctl(
            &configs[0],
            &["copyset", "create", "--id", &meta, "--peers", "1,2,3"],
        );
        let up = json(&configs[0], &["--json", "topology"]).map_or(0, |t| {
            t["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().filter(|n| n["state"] == "up").count())
        });
        if up == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "nodes not up");
        std::thread::sleep(Duration::from_millis(300));
    }
    let created = chunkctl(
        &configs[0],
        &["volume", "create", "--name", "v", "--size", "1GiB"],
    );
    assert!(created.status.success(), "{}", text(&created));
    let before = pool(&configs[0]);
    let on_lost: Vec<u64> = before
        .iter()
        .filter(|(_, peers)| peers.contains(&4))
        .map(|(c, _)| *c)
        .collect();
    assert!(
        !on_lost.is_empty(),
        "node 4 holds pool replicas: {before:?}"
    );

    let nbd_addr = format!("127.0.0.1:{}", ports[8]);
    let mut nbd = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[0])
        .args(["--listen", &nbd_addr, "--volume", "v"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start chunkserver nbd");
    wait_for_port(&nbd_addr, &mut nbd);
    cluster.children.push(Some(nbd));
    let uri = format!("nbd://{nbd_addr}/v");
    Some(Setup {
        _dir: dir,
        configs,
        cluster,
        uri,
        on_lost,
    })
}

/// Waits until every pool copyset has three voters again, none of them node 4; gives the
/// time since `lost_at`.
fn wait_for_recovery(config: &std::path::Path, lost_at: Instant) -> Duration {
    loop {
        let now = pool(config);
        if !now.is_empty() && now.iter().all(|(_, p)| p.len() == 3 && !p.contains(&4)) {
            return lost_at.elapsed();
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(90),
            "not recovered within 90 s: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILLs node `id` (1-based) of the cluster.
fn kill(cluster: &mut Cluster, id: usize) {
    if let Some(mut node) = cluster.children[id - 1].take() {
        node.kill().expect("SIGKILL");
        let _ = node.wait();
    }
}

#[test]
fn a_node_lost_for_good_is_replaced_while_fio_verifies_through_nbd() {
    let Some(Setup {
        _dir,
        configs,
        mut cluster,
        uri,
        on_lost,
    }) = four_nodes_and_an_export("balance_copysets = false")
    else {
        return;
    };
    let writer = fio(&uri, &[]).spawn().expect("run fio");

    std::thread::sleep(Duration::from_secs(3));
    let lost_at = Instant::now();
    kill(&mut cluster, 4);
    let recovered = wait_for_recovery(&configs[0], lost_at);
    println!(
        "recovered {} copysets {:.1} s after node 4 was killed (offline after 3 s)",
        on_lost.len(),
        recovered.as_secs_f64()
    );
    let written = writer.wait_with_output().expect("fio");
    assert!(written.status.success(), "fio: {}", text(&written));
    println!(
        "fio done {:.1} s after node 4 was killed",
        lost_at.elapsed().as_secs_f64()
    );
    // Healthy: every voter of each recovered copyset within 1000 entries of its leader's
    // commit (chunkctl health's bound). Checked once fio is done: under a saturating load a
    // new replica does not catch up yet (docs/benchmarking.md, "Recovery").
    let replicas_of = |status: &serde_json::Value, id: u64| -> Vec<serde_json::Value> {
        status["copysets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["copyset"].as_u64() == Some(id))
            .flat_map(|c| c["replicas"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let now = pool(&configs[0]);
    loop {
        let status = json(&configs[0], &["--json", "status"]).unwrap_or_default();
        let healthy = on_lost.iter().all(|id| {
            let Some((_, voters)) = now.iter().find(|(c, _)| c == id) else {
                return false;
            };
            let replicas = replicas_of(&status, *id);
            let Some(commit) = replicas
                .iter()
                .filter(|r| r["role"] == "leader")
                .filter_map(|r| r["commit"].as_u64())
                .max()
            else {
                return false;
            };
            voters.iter().all(|v| {
                replicas.iter().any(|r| {
                    r["node"].as_u64() == Some(*v)
                        && r["applied"].as_u64().unwrap_or(0) + 1000 >= commit
                })
            })
        });
        if healthy {
            break;
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(180),
            "recovered copysets not caught up: {status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "every voter within 1000 entries of its leader {:.1} s after node 4 was killed",
        lost_at.elapsed().as_secs_f64()
    );

    // Node 4 returns with its old replicas: it must lead none of the copysets it left.
    cluster.children[3] = Some(start(&configs[3]));
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(6) {
        if let Some(status) = json(&configs[0], &["--json", "status"]) {
            for copyset in status["copysets"].as_array().into_iter().flatten() {
                let id = copyset["copyset"].as_u64().unwrap_or(0);
                if !on_lost.contains(&id) {
                    continue;
                }
                for replica in copyset["replicas"].as_array().into_iter().flatten() {
                    assert!(
                        !(replica["node"] == 4 && replica["role"] == "leader"),
                        "node 4 leads copyset {id}, which it was removed from: {copyset}"
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // ... and the service has it remove the replicas it was left behind with (replica
    // balancing is off in this test: on, it may add node 4 to those copysets again, reusing
    // the replica as a joining one, which raft brings up to date).
    let cleaned = loop {
        let held: Vec<u64> = json(&configs[0], &["--json", "topology"])
            .and_then(|t| {
                t["nodes"].as_array().and_then(|nodes| {
                    nodes.iter().find(|n| n["node"] == 4).map(|n| {
                        n["last"]["replicas"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| r["copyset"].as_u64())
                            .filter(|c| on_lost.contains(c))
                            .collect()
                    })
                })
            })
            .unwrap_or_else(|| on_lost.clone());
        if held.is_empty() {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "node 4 still holds stale replicas of {held:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    println!(
        "node 4's stale replicas removed {:.1} s after it came back",
        cleaned.as_secs_f64()
    );
    let verified = fio(&uri, &["--verify_only"]).output().expect("fio");
    assert!(
        verified.status.success(),
        "fio --verify_only: {}",
        text(&verified)
    );
    drop(cluster);
}

/// The placement service's node (the metadata copyset's leader), as `chunkctl topology` says.
fn service(config: &std::path::Path) -> Option<u64> {
    json(config, &["--json", "topology"]).and_then(|t| t["service"].as_u64())
}

/// Issue 19: the placement service's leader dies (SIGKILL) while fio writes through NBD and a
/// recovery runs (installs paced at 4 MiB/s per shard, so the new replicas take seconds): a
/// new leader takes over, the recovery completes without node 4, and fio sees no error. The
/// killed node is started again once the new leader answers (with two of four nodes down, the
/// copysets they share would have no quorum).
#[test]
fn the_service_leader_dies_during_io_and_a_recovery_and_a_new_one_finishes_it() {
    let Some(Setup {
        _dir,
        configs,
        mut cluster,
        uri,
        on_lost,
    }) = four_nodes_and_an_export(
        "recovery_mib_per_s = 8\nmax_recoveries = 1\nmax_recoveries_per_node = 1",
    )
    else {
        return;
    };
    let voters_before = pool(&configs[0]);
    let writer = fio(&uri, &[]).spawn().expect("run fio");
    std::thread::sleep(Duration::from_secs(4));
    let lost_at = Instant::now();
    kill(&mut cluster, 4);
    // The recovery has begun once the scheduler lists a replacement of node 4 running
    // (one at a time: `max_recoveries = 1`; each runs until its new replica installed).
    let running: Vec<u64> = loop {
        let listed = json(&configs[0], &["--json", "scheduler", "operators"]).unwrap_or_default();
        let running: Vec<u64> = listed["operators"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["kind"] == "replace" && o["from"] == 4 && o["state"] == "running")
            .filter_map(|o| o["copyset"].as_u64())
            .collect();
        if !running.is_empty() {
            break running;
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(60),
            "no recovery began: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let moved_at_kill = pool(&configs[0])
        .iter()
        .filter(|(_, peers)| !peers.contains(&4))
        .count()
        .saturating_sub(voters_before.len() - on_lost.len());
    let leader = loop {
        if let Some(leader) = service(&configs[0]) {
            break leader;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "recovery under way {:.1} s after node 4 was killed (copyset {} being replaced; {} of {} \
         copysets moved): SIGKILL to the service leader, node {leader}",
        lost_at.elapsed().as_secs_f64(),
        running[0],
        moved_at_kill,
        on_lost.len()
    );
    assert!(
        moved_at_kill < on_lost.len(),
        "the recovery was over before the service leader was killed"
    );
    // An admin cancels the running replacement (it is held out of planning for ten
    // intervals, then planned again — here by the next service leader).
    let cancel = running[0].to_string();
    let cancelled = json(
        &configs[0],
        &["--json", "scheduler", "cancel", "--copyset", &cancel],
    )
    .unwrap_or_default();
    let state = cancelled["operators"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["copyset"].as_u64() == Some(running[0]))
        .map(|o| o["state"].clone());
    assert!(
        matches!(
            state.as_ref().and_then(|s| s.as_str()),
            Some("cancelling" | "held")
        ),
        "the cancelled operator is not marked so: {cancelled}"
    );
    let killed_at = Instant::now();
    kill(&mut cluster, leader as usize);
    let others: Vec<_> = (1..=3).filter(|n| *n != leader as usize).collect();
    let new_leader = loop {
        if let Some(now) = service(&configs[others[0] - 1]).filter(|s| *s != leader) {
            break now;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no new placement service leader"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "node {new_leader} leads the placement service {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    cluster.children[leader as usize - 1] = Some(start(&configs[leader as usize - 1]));
    let recovered = wait_for_recovery(&configs[others[0] - 1], lost_at);
    println!(
        "recovered {} copysets {:.1} s after node 4 was killed",
        on_lost.len(),
        recovered.as_secs_f64()
    );
    let written = writer.wait_with_output().expect("fio");
    assert!(written.status.success(), "fio: {}", text(&written));
    let verified = fio(&uri, &["--verify_only"]).output().expect("fio");
    assert!(
        verified.status.success(),
        "fio --verify_only: {}",
        text(&verified)
    );
    drop(cluster);
}
