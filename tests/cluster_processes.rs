//! Three real `chunkserver run` processes on loopback, each with its own configuration file
//! and device file: the leader's process is killed with SIGKILL in the middle of a write load,
//! a new leader takes over, every acknowledged write is still readable, and the killed node,
//! restarted from its files, catches up with the others.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_ports, start, write_config, Cluster};
use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::ids::{ChunkId, CopysetId};
use glommio::{LocalExecutorBuilder, Placement};

const COPYSET: CopysetId = CopysetId(11);

fn block(value: u64) -> Bytes {
    let mut data = vec![0u8; 4096];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value.wrapping_mul(31) as u8) ^ (i as u8);
    }
    data[..8].copy_from_slice(&value.to_le_bytes());
    Bytes::from(data)
}

/// Starts `body` on a client executor of the cluster on `ports` (nodes of `shards` shards),
/// with `copysets` known to live on nodes 1 to 3.
fn spawn_client<T: Send + 'static>(
    ports: &[u16],
    shards: u32,
    copysets: &'static [u64],
    deadline: Duration,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> glommio::ExecutorJoinHandle<T> {
    let addresses: Vec<NodeAddress> = (0..3)
        .map(|n| NodeAddress {
            id: n as u64 + 1,
            endpoint: format!("tcp://127.0.0.1:{}", ports[2 * n + 1])
                .parse()
                .expect("endpoint"),
            shards,
        })
        .collect();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("process-test-client")
        .spawn(move || async move {
            let config = ClientConfig {
                deadline,
                ..ClientConfig::default()
            };
            let client = Client::new(&addresses, config);
            for copyset in copysets {
                client.set_peers(CopysetId(*copyset), &[1, 2, 3]);
            }
            body(client).await
        })
        .expect("client executor")
}

/// Runs `body` on a client executor (one shard per node) and waits for it.
fn with_client<T: Send + 'static>(
    ports: &[u16],
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    spawn_client(ports, 1, &[COPYSET.0], Duration::from_secs(30), body)
        .join()
        .expect("client thread")
}

#[test]
fn a_killed_leader_loses_no_acknowledged_write_and_catches_up_after_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let configs: Vec<PathBuf> = (1..=3)
        .map(|id| write_config(dir.path(), id, &ports))
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };

    // Phase 1: create the copyset and write the first half; learn the leader.
    let leader = with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..64u64 {
                client
                    .write(
                        COPYSET,
                        ChunkId(1 + i / 32),
                        (i % 32) as u32 * 4096,
                        block(i),
                        1,
                    )
                    .await
                    .expect("write");
            }
            client.cached_leader(COPYSET).expect("leader")
        })
    });

    // SIGKILL the leader's process: no clean shutdown, no final sync.
    let index = leader as usize - 1;
    if let Some(mut child) = cluster.children[index].take() {
        child.kill().expect("kill -9 the leader");
        child.wait().expect("reap");
    }

    // Phase 2: the survivors elect a leader; more writes; everything acknowledged reads back.
    with_client(&ports, move |client| {
        Box::pin(async move {
            for i in 64..128u64 {
                client
                    .write(
                        COPYSET,
                        ChunkId(1 + i / 32),
                        (i % 32) as u32 * 4096,
                        block(i),
                        1,
                    )
                    .await
                    .expect("write after the kill");
            }
            assert_ne!(
                client.cached_leader(COPYSET),
                Some(leader),
                "a new leader serves"
            );
            for i in 0..128u64 {
                let data = client
                    .read(COPYSET, ChunkId(1 + i / 32), (i % 32) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "acknowledged block {i}");
            }
        })
    });

    // Phase 3: restart the killed node from its files; it catches up with the leader's log.
    cluster.children[index] = Some(start(&configs[index]));
    with_client(&ports, move |client| {
        Box::pin(async move {
            let started = Instant::now();
            loop {
                let mut applied = Vec::new();
                for node in 1..=3 {
                    match client.copyset_status(node, COPYSET).await {
                        Ok(status) => applied.push(status.applied),
                        Err(_) => applied.push(0),
                    }
                }
                if applied.iter().all(|&a| a == applied[0] && a > 0) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the restarted node did not catch up: applied {applied:?}"
                );
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        })
    });

    // SIGTERM stops each process cleanly, with exit status 0.
    for child in cluster.children.iter_mut().flatten() {
        let pid = child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("send SIGTERM");
        assert!(status.success());
    }
    for slot in cluster.children.iter_mut() {
        if let Some(mut child) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break status;
                }
                assert!(
                    Instant::now() < deadline,
                    "a chunkserver did not stop on SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(status.success(), "clean exit on SIGTERM: {status}");
        }
    }
}

/// Copysets of the sharded test, spread over both shards of every node.
const SHARDED_COPYSETS: [u64; 4] = [21, 22, 23, 24];
/// Writes per copyset in the sharded test: 32 KiB each, 32 per 1 MiB chunk, each place once.
const SHARDED_WRITES: u64 = 384;

fn sharded_data(copyset: u64, i: u64) -> Bytes {
    let one = block(copyset << 32 | i);
    let mut data = Vec::with_capacity(32 << 10);
    for _ in 0..8 {
        data.extend_from_slice(&one);
    }
    Bytes::from(data)
}

/// Where write `i` of `copyset` lands: chunk ids are shard-wide, so each copyset has its own.
fn sharded_place(copyset: u64, i: u64) -> (ChunkId, u32) {
    (
        ChunkId(copyset * 100 + 1 + i / 32),
        (i % 32) as u32 * (32 << 10),
    )
}

fn sharded_client<T: Send + 'static>(
    ports: &[u16],
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> glommio::ExecutorJoinHandle<T> {
    spawn_client(ports, 2, &SHARDED_COPYSETS, Duration::from_secs(20), body)
}

/// Waits until every replica of every copyset reports the same applied index.
async fn converge(client: &Client, within: Duration) {
    let started = Instant::now();
    loop {
        let mut all = Vec::new();
        for copyset in SHARDED_COPYSETS {
            let mut applied = Vec::new();
            for node in 1..=3 {
                applied.push(
                    client
                        .copyset_status(node, CopysetId(copyset))
                        .await
                        .map_or(0, |s| s.applied),
                );
            }
            all.push(applied);
        }
        if all.iter().all(|a| a[0] > 0 && a.iter().all(|x| *x == a[0])) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "replicas did not converge: applied {all:?}"
        );
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads back every acknowledged write of every copyset.
async fn read_back(client: &Client, acked: &[(u64, u64)]) {
    for &(copyset, i) in acked {
        let (chunk, offset) = sharded_place(copyset, i);
        let data = client
            .read(CopysetId(copyset), chunk, u64::from(offset), 32 << 10)
            .await
            .unwrap_or_else(|e| panic!("read {copyset}/{i}: {e}"));
        assert_eq!(
            data,
            sharded_data(copyset, i),
            "copyset {copyset} write {i}"
        );
    }
}

fn stop_all(cluster: &mut Cluster) {
    for child in cluster.children.iter_mut().flatten() {
        let pid = child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("send SIGTERM");
        assert!(status.success());
    }
    for slot in cluster.children.iter_mut() {
        if let Some(mut child) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break status;
                }
                assert!(Instant::now() < deadline, "a chunkserver ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(status.success(), "clean exit on SIGTERM: {status}");
        }
    }
}

/// Three processes with two shards each and four copysets. Mid-load, the process that leads
/// the first copyset is killed with SIGKILL; writes go on through new leaders. With an 8 MiB
/// WAL per shard the survivors compact their logs many times, so the restarted node catches
/// up by snapshot installs (and the log after them). It then leads every copyset and serves
/// every acknowledged write from its own chunks, along with the other chunk services; finally
/// the whole cluster stops with SIGTERM, starts again from its files, and reads it all back.
#[test]
fn sharded_processes_survive_a_kill_mid_load_catch_up_and_a_full_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(7);
    let metrics_port = ports[6];
    let hosts = vec!["127.0.0.1".to_string(); 3];
    let configs: Vec<PathBuf> = (1..=3)
        .map(|id| {
            common::write_config_sharded(dir.path(), id, &hosts, &ports, "192MiB", "16MiB", 2)
        })
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };

    let victim = sharded_client(&ports, |client| {
        Box::pin(async move {
            for copyset in SHARDED_COPYSETS {
                client
                    .create_copyset(CopysetId(copyset), &[1, 2, 3])
                    .await
                    .expect("create copyset");
            }
            let first = CopysetId(SHARDED_COPYSETS[0]);
            let (chunk, offset) = sharded_place(first.0, 0);
            client
                .write(first, chunk, offset, sharded_data(first.0, 0), 1)
                .await
                .expect("first write");
            client.cached_leader(first).expect("leader")
        })
    })
    .join()
    .expect("client thread");

    // The load: one writer per copyset, each place written once, bounded in count and time.
    let load = sharded_client(&ports, |client| {
        Box::pin(async move {
            let client = std::rc::Rc::new(client);
            let writers: Vec<_> = SHARDED_COPYSETS
                .iter()
                .map(|&copyset| {
                    let client = std::rc::Rc::clone(&client);
                    glommio::spawn_local(async move {
                        let started = Instant::now();
                        let mut acked = Vec::new();
                        for i in 1..SHARDED_WRITES {
                            if started.elapsed() > Duration::from_secs(60) {
                                break;
                            }
                            let (chunk, offset) = sharded_place(copyset, i);
                            let data = sharded_data(copyset, i);
                            match client
                                .write(CopysetId(copyset), chunk, offset, data, 1)
                                .await
                            {
                                Ok(()) => acked.push((copyset, i)),
                                Err(error) => eprintln!(
                                    "copyset {copyset} write {i} at {:?}: {error}",
                                    started.elapsed()
                                ),
                            }
                        }
                        eprintln!(
                            "copyset {copyset}: {} acknowledged in {:?}",
                            acked.len(),
                            started.elapsed()
                        );
                        acked
                    })
                })
                .collect();
            let mut acked = vec![(SHARDED_COPYSETS[0], 0)];
            for writer in writers {
                acked.extend(writer.await);
            }
            acked
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    let index = victim as usize - 1;
    if let Some(mut child) = cluster.children[index].take() {
        child.kill().expect("kill -9 the leader");
        child.wait().expect("reap");
    }
    let acked = load.join().expect("load thread");
    assert!(
        acked.len() as u64 > SHARDED_WRITES * 3,
        "most writes were acknowledged: {}",
        acked.len()
    );
    // It comes back with a metrics endpoint, to tell how it caught up.
    let mut text = std::fs::read_to_string(&configs[index]).expect("config");
    text.push_str(&format!(
        "\n[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"
    ));
    std::fs::write(&configs[index], text).expect("config");
    cluster.children[index] = Some(start(&configs[index]));

    let checked = acked.clone();
    sharded_client(&ports, move |client| {
        Box::pin(async move {
            converge(&client, Duration::from_secs(90)).await;
            let metrics = common::http_get(metrics_port, "/metrics");
            let installs: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("chunkserver_snapshot_installs_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(
                installs >= 1.0,
                "the restarted node caught up without a snapshot install (the others' WALs \
                 should have compacted past it)"
            );
            // The restarted node leads every copyset and serves everything from its chunks.
            for copyset in SHARDED_COPYSETS {
                let copyset = CopysetId(copyset);
                client
                    .transfer_leader(copyset, victim)
                    .await
                    .expect("transfer accepted");
                let started = Instant::now();
                while client
                    .copyset_status(victim, copyset)
                    .await
                    .map_or(true, |s| s.role != 3)
                {
                    assert!(started.elapsed() < Duration::from_secs(20), "no transfer");
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
            }
            read_back(&client, &checked).await;
            // The other chunk services, on the first copyset.
            let first = CopysetId(SHARDED_COPYSETS[0]);
            let (source, offset) = sharded_place(first.0, 0);
            client
                .create_clone_chunk(first, ChunkId(first.0 * 100 + 99), source, 1)
                .await
                .expect("clone");
            assert_eq!(
                client
                    .read(
                        first,
                        ChunkId(first.0 * 100 + 99),
                        u64::from(offset),
                        32 << 10
                    )
                    .await
                    .expect("read the clone"),
                sharded_data(first.0, 0),
                "a clone reads through to its source"
            );
            let clone = ChunkId(first.0 * 100 + 99);
            client.delete(first, clone, 1).await.expect("delete");
            assert_eq!(
                client
                    .read(first, clone, 0, 4096)
                    .await
                    .expect("read a deleted chunk"),
                Bytes::from(vec![0u8; 4096])
            );
        })
    })
    .join()
    .expect("client thread");

    // The whole cluster stops cleanly, starts from its files, and has everything.
    stop_all(&mut cluster);
    cluster.children = configs.iter().map(|c| Some(start(c))).collect();
    sharded_client(&ports, move |client| {
        Box::pin(async move {
            read_back(&client, &acked).await;
            converge(&client, Duration::from_secs(60)).await;
        })
    })
    .join()
    .expect("client thread");
    stop_all(&mut cluster);
}
