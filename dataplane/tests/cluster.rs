//! Three chunkservers on loopback, in this process, each with its own shard executor: writes
//! replicate and read back, survive the loss of the leader, and survive a restart of the whole
//! cluster from its files. Every node listens on 127.0.0.1 and stops on its own signal.

mod common;

use std::time::{Duration, Instant};

use common::{block, config, config_over, free_ports, with_client, with_client_over, Node};
use dataplane::ids::{ChunkId, CopysetId};

const COPYSET: CopysetId = CopysetId(7);

#[test]
fn writes_replicate_read_back_and_survive_the_leader_stopping() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();

    let leader = with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                client
                    .write(COPYSET, chunk, (i as u32 / 2) * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                let data = client
                    .read(COPYSET, chunk, u64::from(i as u32 / 2) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
            // A never-written region reads as zeroes.
            let zeroes = client
                .read(COPYSET, ChunkId(9), 0, 4096)
                .await
                .expect("read");
            assert!(zeroes.iter().all(|&b| b == 0));
            let leader = client.cached_leader(COPYSET).expect("a leader answered");
            // Every replica applied everything.
            let started = Instant::now();
            loop {
                let mut applied = Vec::new();
                for node in 1..=3 {
                    applied.push(
                        client
                            .copyset_status(node, COPYSET)
                            .await
                            .expect("status")
                            .applied,
                    );
                }
                if applied.iter().all(|&a| a == applied[0]) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "replicas lag: {applied:?}"
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            leader
        })
    });

    // Stop the leader; the other two elect a new one and keep every acknowledged write.
    nodes[leader as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            for i in 32..48u64 {
                client
                    .write(COPYSET, ChunkId(3), (i as u32 - 32) * 4096, block(i), 1)
                    .await
                    .expect("write after failover");
            }
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                let data = client
                    .read(COPYSET, chunk, u64::from(i as u32 / 2) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i} after failover");
            }
            let new_leader = client.cached_leader(COPYSET).expect("new leader");
            assert_ne!(new_leader, leader);
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_cluster_restarted_from_its_files_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..24u64 {
                client
                    .write(COPYSET, ChunkId(5), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            for i in 0..24u64 {
                let data = client
                    .read(COPYSET, ChunkId(5), i * 4096, 4096)
                    .await
                    .expect("read after restart");
                assert_eq!(data, block(i), "block {i} after restart");
            }
            client
                .write(COPYSET, ChunkId(5), 0, block(99), 1)
                .await
                .expect("write after restart");
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(5), 0, 4096)
                    .await
                    .expect("read"),
                block(99)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn replication_and_clients_work_over_softrdma() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config_over(id, &ports, dir.path(), "mem", "softrdma")))
        .collect();
    with_client_over(&ports, "softrdma", |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..16u64 {
                client
                    .write(COPYSET, ChunkId(4), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
            for i in 0..16u64 {
                let data = client
                    .read(COPYSET, ChunkId(4), i * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn leadership_moves_to_the_node_it_is_transferred_to() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            client
                .write(COPYSET, ChunkId(1), 0, block(1), 1)
                .await
                .expect("write");
            let leader = client.cached_leader(COPYSET).expect("leader");
            let target = if leader == 3 { 1 } else { leader + 1 };
            client
                .transfer_leader(COPYSET, target)
                .await
                .expect("transfer accepted");
            let started = Instant::now();
            loop {
                let status = client
                    .copyset_status(target, COPYSET)
                    .await
                    .expect("status");
                if status.role == 3 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no transfer: {status:?}"
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            client
                .write(COPYSET, ChunkId(1), 4096, block(2), 1)
                .await
                .expect("write after");
            assert_eq!(client.cached_leader(COPYSET), Some(target));
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(1), 0, 4096)
                    .await
                    .expect("read"),
                block(1)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// The same over real verbs (`rdma://`): runs where an RDMA device exists — in CI, inside the
/// Soft-RoCE guest that `scripts/rdma-tests` starts — and says it skipped elsewhere.
#[cfg(feature = "rdma")]
#[test]
fn replication_and_clients_work_over_real_verbs() {
    let devices = dataplane::net::verbs::ibverbs::IbVerbs::device_names();
    if devices.is_empty() {
        assert!(
            std::env::var_os("RDMA_TESTS_REQUIRE_DEVICE").is_none(),
            "RDMA_TESTS_REQUIRE_DEVICE is set but there is no RDMA device"
        );
        eprintln!("SKIPPED: no RDMA device on this host (scripts/rdma-tests runs this in a guest)");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config_over(id, &ports, dir.path(), "mem", "rdma")))
        .collect();
    with_client_over(&ports, "rdma", |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..8u64 {
                client
                    .write(COPYSET, ChunkId(4), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
            for i in 0..8u64 {
                let data = client
                    .read(COPYSET, ChunkId(4), i * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
