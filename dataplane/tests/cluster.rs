//! Three chunkservers on loopback, in this process, each with its own shard executor: writes
//! replicate and read back, survive the loss of the leader, and survive a restart of the whole
//! cluster from its files. Every node listens on 127.0.0.1 and stops on its own signal.

mod common;

use std::time::{Duration, Instant};

use common::{
    addresses_of_cluster, block, config, config_of_cluster, config_over, free_ports, with_client,
    with_client_of, with_client_over, Node,
};
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

/// Three nodes whose peer and client listeners all use `scheme`: a copyset is created, and
/// writes replicate and read back.
fn replicate_over(scheme: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config_over(id, &ports, dir.path(), "mem", scheme)))
        .collect();
    with_client_over(&ports, scheme, |client| {
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

#[test]
fn replication_and_clients_work_over_softrdma() {
    replicate_over("softrdma");
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
    replicate_over("rdma");
}

/// Polls `node`'s status of the copyset until `done` holds (bounded).
async fn wait_status(
    client: &dataplane::client::Client,
    node: u64,
    what: &str,
    done: impl Fn(&dataplane::protocol::CopysetStatus) -> bool,
) -> dataplane::protocol::CopysetStatus {
    let started = Instant::now();
    loop {
        if let Ok(status) = client.copyset_status(node, COPYSET).await {
            if done(&status) {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "node {node}: {what}: {status:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "node {node}: {what}: no status"
        );
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_node_is_replaced_under_load_and_the_new_member_survives_a_restart() {
    const WRITES: u64 = 90;
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let node_config = |id: u32| config_of_cluster(id, 4, &ports, dir.path(), "uring", "tcp");
    let mut nodes: Vec<Node> = (1..=4).map(|id| Node::start(node_config(id))).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);

    let commit = with_client_of(addresses.clone(), |client| {
        Box::pin(async move {
            let client = std::rc::Rc::new(client);
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            // Writes in flight while the membership changes: two writers, each write
            // acknowledged before that writer's next one; every one must succeed.
            let acked = std::rc::Rc::new(std::cell::Cell::new(0u64));
            let writers: Vec<_> = (0..2u64)
                .map(|writer| {
                    let client = std::rc::Rc::clone(&client);
                    let acked = std::rc::Rc::clone(&acked);
                    glommio::spawn_local(async move {
                        for i in (writer..WRITES).step_by(2) {
                            client
                                .write(
                                    COPYSET,
                                    ChunkId(1 + i % 3),
                                    (i as u32 / 3) * 4096,
                                    block(i),
                                    1,
                                )
                                .await
                                .unwrap_or_else(|e| panic!("write {i}: {e}"));
                            acked.set(acked.get() + 1);
                        }
                    })
                })
                .collect();
            // Once some writes landed, replace node 3 by node 4 (joint consensus): node 4's
            // replica starts from the copyset's bootstrap and takes the log from index 2.
            let started = Instant::now();
            while acked.get() < 20 {
                assert!(started.elapsed() < Duration::from_secs(15), "writes stall");
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let membership = client
                .set_voters(COPYSET, &[1, 2, 3], &[1, 2, 4], &[1, 2, 3])
                .await
                .expect("change peers");
            assert_eq!(membership.voters, vec![1, 2, 4]);
            assert!(membership.voters_outgoing.is_empty(), "{membership:?}");
            assert!(
                acked.get() < WRITES,
                "the change ran while writes were in flight"
            );
            for writer in writers {
                writer.await;
            }
            for i in 0..WRITES {
                let data = client
                    .read(
                        COPYSET,
                        ChunkId(1 + i % 3),
                        u64::from(i as u32 / 3) * 4096,
                        4096,
                    )
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
            let leader = client.cached_leader(COPYSET).expect("leader");
            assert_ne!(leader, 3, "node 3 is no longer a voter, so it cannot lead");
            let leader_status = client
                .copyset_status(leader, COPYSET)
                .await
                .expect("status");
            assert_eq!(leader_status.membership.voters, vec![1, 2, 4]);
            // Node 4 catches up with the leader and knows the new membership.
            let target = leader_status.commit;
            let status = wait_status(&client, 4, "catch up", |s| s.applied >= target).await;
            assert_eq!(status.membership.voters, vec![1, 2, 4]);
            assert!(status.membership.voters_outgoing.is_empty());
            target
        })
    });

    // Node 3 goes; node 4 restarts from its files: it re-applies its log from the
    // checkpointed applied index, membership changes included, and ends with the new
    // membership. Then the whole new membership restarts and commits without node 3; with
    // node 2 stopped too, a write needs node 4's vote and acknowledgement.
    nodes[2].stop();
    nodes[3].stop();
    nodes[3] = Node::start(node_config(4));
    with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            let status = wait_status(&client, 4, "re-applied after the restart", |s| {
                s.applied >= commit
            })
            .await;
            assert_eq!(status.membership.voters, vec![1, 2, 4], "{status:?}");
            assert!(status.membership.voters_outgoing.is_empty(), "{status:?}");
        })
    });
    for id in [1, 2, 4] {
        nodes[id - 1].stop();
    }
    for id in [1, 2, 4] {
        nodes[id - 1] = Node::start(node_config(id as u32));
    }
    with_client_of(addresses.clone(), |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 4]);
            client
                .write(COPYSET, ChunkId(9), 0, block(1000), 1)
                .await
                .expect("write after the restart, without node 3");
            for i in 0..WRITES {
                let data = client
                    .read(
                        COPYSET,
                        ChunkId(1 + i % 3),
                        u64::from(i as u32 / 3) * 4096,
                        4096,
                    )
                    .await
                    .expect("read after the restart");
                assert_eq!(data, block(i), "block {i} after the restart");
            }
        })
    });
    nodes[1].stop();
    with_client_of(addresses, |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 4]);
            client
                .write(COPYSET, ChunkId(9), 4096, block(1001), 1)
                .await
                .expect("write by nodes 1 and 4 alone");
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(9), 4096, 4096)
                    .await
                    .expect("read"),
                block(1001)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_stopped_follower_restarted_from_its_files_catches_up() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    let leader = with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            client
                .write(COPYSET, ChunkId(6), 0, block(0), 1)
                .await
                .expect("write");
            client.cached_leader(COPYSET).expect("leader")
        })
    });
    // Stop a follower; the other two keep committing.
    let follower = if leader == 3 { 2 } else { 3 };
    nodes[follower as usize - 1].stop();
    with_client(&ports, |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            for i in 1..16u64 {
                client
                    .write(COPYSET, ChunkId(6), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
        })
    });
    nodes[follower as usize - 1] =
        Node::start(config(follower as u32, &ports, dir.path(), "uring"));
    with_client(&ports, move |client| {
        Box::pin(async move {
            let started = Instant::now();
            loop {
                let leader_status = client
                    .copyset_status(leader, COPYSET)
                    .await
                    .expect("status");
                let status = client.copyset_status(follower, COPYSET).await;
                if let Ok(status) = status {
                    if status.applied >= leader_status.commit && status.applied > 0 {
                        break;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "node {follower} did not catch up with the leader"
                );
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_quiescent_copyset_elects_a_new_leader_when_its_leader_stops() {
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
            client
                .write(COPYSET, ChunkId(8), 0, block(0), 1)
                .await
                .expect("write");
            // Idle for several election timeouts: the group stops heartbeating.
            glommio::timer::sleep(Duration::from_millis(1500)).await;
            client.cached_leader(COPYSET).expect("leader")
        })
    });
    nodes[leader as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            client
                .write(COPYSET, ChunkId(8), 4096, block(1), 1)
                .await
                .expect("write after");
            assert_ne!(client.cached_leader(COPYSET), Some(leader));
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(8), 0, 4096)
                    .await
                    .expect("read"),
                block(0)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// A follower that is down while the others write more than half their WAL comes back behind
/// the leader's log compaction: it installs the copyset's snapshot by copying the chunks
/// (a deleted chunk goes, a chunk's copy-on-write snapshot comes along), then follows the log;
/// once it leads, every acknowledged write reads back from it.
#[test]
fn a_follower_behind_the_log_compaction_installs_the_chunks_and_serves_them() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    let leader = with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for chunk in 1..=3u64 {
                client
                    .write(COPYSET, ChunkId(chunk), 0, block(chunk), 1)
                    .await
                    .expect("write");
            }
            client.cached_leader(COPYSET).expect("leader")
        })
    });
    let follower = if leader == 3 { 2 } else { 3 };
    nodes[follower as usize - 1].stop();
    // 64 KiB writes: 300 of them pass a 16 MiB WAL ring, so the others checkpoint and
    // compact their logs past everything the follower has.
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            client.delete(COPYSET, ChunkId(2), 1).await.expect("delete");
            // Chunk 3 gets a snapshot at sn 1 when a write with sn 2 reaches it.
            client
                .write(COPYSET, ChunkId(3), 4096, block(33), 2)
                .await
                .expect("write with a newer sn");
            client
                .write(COPYSET, ChunkId(3), 0, block(34), 2)
                .await
                .expect("write with the newer sn");
            // Chunk 50 is a lazy clone of chunk 1, with one page pasted.
            client
                .create_clone_chunk(COPYSET, ChunkId(50), ChunkId(1), 1)
                .await
                .expect("clone");
            client
                .paste_chunk(COPYSET, ChunkId(50), 4096, block(51))
                .await
                .expect("paste");
            write_past_the_wal(&client).await;
        })
    });
    let metrics_port = free_ports(1)[0];
    let mut restarted = config(follower as u32, &ports, dir.path(), "uring");
    restarted.metrics.address = Some(
        format!("127.0.0.1:{metrics_port}")
            .parse()
            .expect("address"),
    );
    nodes[follower as usize - 1] = Node::start(restarted);
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            let commit = client
                .copyset_status(leader, COPYSET)
                .await
                .expect("leader status")
                .commit;
            wait_status(&client, follower, "catch up after the compaction", |s| {
                s.applied >= commit
            })
            .await;
            let metrics = common::http_get(metrics_port, "/metrics");
            let installs = metrics
                .lines()
                .find(|l| l.starts_with("chunkserver_snapshot_installs_total"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok());
            assert!(
                installs.is_some_and(|n| n >= 1.0),
                "the follower caught up without installing a snapshot: {installs:?}"
            );
            // The follower's own view of chunk 3: sn 2 with the snapshot at sn 1.
            let (status, body) = client
                .call_node(
                    follower,
                    COPYSET,
                    dataplane::protocol::GET_CHUNK_INFO,
                    bytes::Bytes::copy_from_slice(&3u64.to_le_bytes()),
                )
                .await
                .expect("chunk info");
            assert_eq!(status, dataplane::protocol::Status::Ok);
            assert_eq!(&body[8..16], &2u64.to_le_bytes(), "chunk 3's sn");
            assert_eq!(body[16], 1, "chunk 3 has a snapshot");
            assert_eq!(&body[17..25], &1u64.to_le_bytes(), "its snapshot's sn");
            let (status, _) = client
                .call_node(
                    follower,
                    COPYSET,
                    dataplane::protocol::GET_CHUNK_INFO,
                    bytes::Bytes::copy_from_slice(&2u64.to_le_bytes()),
                )
                .await
                .expect("chunk info");
            assert_eq!(
                status,
                dataplane::protocol::Status::ChunkNotFound,
                "chunk 2 was deleted while the follower was down"
            );
            // Lead from the follower and read everything back from its chunks.
            client
                .transfer_leader(COPYSET, follower)
                .await
                .expect("transfer accepted");
            wait_status(&client, follower, "lead", |s| s.role == 3).await;
            let client = &client;
            let read = |chunk: u64, offset: u32, len: u32| async move {
                client
                    .read(COPYSET, ChunkId(chunk), u64::from(offset), len)
                    .await
                    .expect("read")
            };
            assert_eq!(read(1, 0, 4096).await, block(1));
            assert_eq!(read(2, 0, 4096).await, bytes::Bytes::from(vec![0u8; 4096]));
            assert_eq!(read(3, 0, 4096).await, block(34));
            assert_eq!(read(3, 4096, 4096).await, block(33));
            let snapshot = client
                .read_snapshot(COPYSET, ChunkId(3), 1, 0, 8192)
                .await
                .expect("read the snapshot");
            assert_eq!(
                &snapshot[..4096],
                &block(3)[..],
                "the snapshot's first page"
            );
            assert!(
                snapshot[4096..].iter().all(|b| *b == 0),
                "never written at sn 1"
            );
            // The clone reads through to chunk 1 where it was not pasted, and chunk 1 stays
            // read-only while the clone exists, on the new leader as on the old.
            assert_eq!(read(50, 0, 4096).await, block(1));
            assert_eq!(read(50, 4096, 4096).await, block(51));
            let refused = client.write(COPYSET, ChunkId(1), 0, block(2), 1).await;
            assert!(
                matches!(refused, Err(dataplane::client::ClientError::Refused { .. })),
                "a clone's source refuses writes: {refused:?}"
            );
            client
                .flatten_chunk(COPYSET, ChunkId(50))
                .await
                .expect("flatten");
            client
                .write(COPYSET, ChunkId(1), 0, block(2), 1)
                .await
                .expect("the source is writable once no clone reads it");
            assert_eq!(
                read(50, 0, 4096).await,
                block(1),
                "the flattened clone kept its page"
            );
            check_past_the_wal(client).await;
            // And it takes new writes as the leader.
            client
                .write(COPYSET, ChunkId(1), 8192, block(77), 1)
                .await
                .expect("write to the new leader");
            assert_eq!(read(1, 8192, 4096).await, block(77));
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// 64 KiB of a pattern drawn from `seed`.
fn big(seed: u64) -> bytes::Bytes {
    let mut data = vec![0u8; 64 << 10];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(31).wrapping_add(i as u64 / 4096)) as u8;
    }
    bytes::Bytes::from(data)
}

/// Where write `i` of [`write_past_the_wal`] lands: six chunks, sixteen places each, so write
/// `i` and write `i + 96` hit the same place.
fn past_the_wal_place(i: u64) -> (ChunkId, u32) {
    (ChunkId(10 + i % 6), ((i / 6) % 16) as u32 * (64 << 10))
}

/// 300 writes of 64 KiB: more than a 16 MiB WAL ring holds, so the replicas that take them
/// checkpoint and compact their logs.
async fn write_past_the_wal(client: &dataplane::client::Client) {
    for i in 0..300u64 {
        let (chunk, offset) = past_the_wal_place(i);
        client
            .write(COPYSET, chunk, offset, big(i), 1)
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
}

/// Reads back what [`write_past_the_wal`] left: the last 96 writes.
async fn check_past_the_wal(client: &dataplane::client::Client) {
    for i in 204..300u64 {
        let (chunk, offset) = past_the_wal_place(i);
        let data = client
            .read(COPYSET, chunk, u64::from(offset), 64 << 10)
            .await
            .expect("read");
        assert_eq!(data, big(i), "write {i}");
    }
}

/// A member added once the leader compacted its log past index 2 installs the copyset's
/// snapshot (the chunks) before it takes the log, and serves every write once it leads.
#[test]
fn a_member_added_after_the_log_compaction_installs_the_chunks() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let node_config = |id: u32| config_of_cluster(id, 4, &ports, dir.path(), "uring", "tcp");
    let mut nodes: Vec<Node> = (1..=4).map(|id| Node::start(node_config(id))).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);
    with_client_of(addresses, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            write_past_the_wal(&client).await;
            // No initial peers: node 4's replica starts empty and learns everything, the
            // membership included, from the leader's snapshot.
            let membership = client
                .set_voters(COPYSET, &[1, 2, 3], &[1, 2, 4], &[])
                .await
                .expect("change peers");
            assert_eq!(membership.voters, vec![1, 2, 4]);
            let leader = client.cached_leader(COPYSET).expect("leader");
            let commit = client
                .copyset_status(leader, COPYSET)
                .await
                .expect("leader status")
                .commit;
            wait_status(&client, 4, "catch up", |s| s.applied >= commit).await;
            client
                .transfer_leader(COPYSET, 4)
                .await
                .expect("transfer accepted");
            wait_status(&client, 4, "lead", |s| s.role == 3).await;
            check_past_the_wal(&client).await;
            assert_eq!(client.cached_leader(COPYSET), Some(4));
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// CopysetService delete and CliService reset peers: a replica removed from the membership
/// is deleted with its chunks and stays deleted across a restart; when the copyset then loses
/// its quorum for good, resetting the survivor's peers to itself lets it serve again with
/// every acknowledged write. The reset needs the admin role (issue 25, item 8): it is refused
/// without the caller's confirmation and without the node's admin token.
#[test]
fn a_removed_replica_is_deleted_and_a_lost_quorum_is_reset() {
    use dataplane::protocol::{Status, GET_CHUNK_INFO};
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "node-one-admin-token-0123\n").expect("token file");
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "uring");
            if id == 1 {
                config.admin.token_file = Some(token_file.clone());
            }
            Node::start(config)
        })
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..8u64 {
                client
                    .write(
                        COPYSET,
                        ChunkId(40 + i % 2),
                        (i / 2) as u32 * 4096,
                        block(i),
                        1,
                    )
                    .await
                    .expect("write");
            }
            let membership = client.remove_peer(COPYSET, 3).await.expect("remove node 3");
            assert_eq!(membership.voters, vec![1, 2]);
            client
                .delete_copyset(COPYSET, 3)
                .await
                .expect("delete on node 3");
            assert!(!client
                .list_copysets(3)
                .await
                .expect("list")
                .contains(&COPYSET));
            let (status, _) = client
                .call_node(
                    3,
                    COPYSET,
                    GET_CHUNK_INFO,
                    bytes::Bytes::copy_from_slice(&40u64.to_le_bytes()),
                )
                .await
                .expect("chunk info");
            assert_eq!(status, Status::ChunkNotFound, "the chunks went with it");
        })
    });
    nodes[2].stop();
    nodes[2] = Node::start(config(3, &ports, dir.path(), "uring"));
    // Node 2 goes for good: {1, 2} has no quorum left.
    nodes[1].stop();
    with_client(&ports, |client| {
        Box::pin(async move {
            let started = Instant::now();
            let listed = loop {
                match client.list_copysets(3).await {
                    Ok(listed) => break listed,
                    Err(error) => assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "node 3 did not come back: {error}"
                    ),
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            };
            assert!(
                !listed.contains(&COPYSET),
                "a deleted replica stays deleted across a restart"
            );
            let token = b"node-one-admin-token-0123";
            for (confirm, token, refusal) in [
                (false, &token[..], "confirmation"),
                (true, &b"node-one-admin-token-0124"[..], "does not match"),
                (true, &b""[..], "does not match"),
            ] {
                let refused = client.reset_peers(COPYSET, 1, &[1], confirm, token).await;
                match refused {
                    Err(error) => assert!(error.to_string().contains(refusal), "{error}"),
                    Ok(()) => panic!("a reset without the admin role was carried out"),
                }
            }
            client
                .reset_peers(COPYSET, 1, &[1], true, token)
                .await
                .expect("reset");
            client.set_peers(COPYSET, &[1]);
            wait_status(&client, 1, "lead alone", |s| s.role == 3).await;
            client
                .write(COPYSET, ChunkId(42), 0, block(99), 1)
                .await
                .expect("write after the reset");
            for i in 0..8u64 {
                let data = client
                    .read(COPYSET, ChunkId(40 + i % 2), (i / 2) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
            let status = client.copyset_status(1, COPYSET).await.expect("status");
            assert_eq!(status.membership.voters, vec![1]);
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Nodes with two shards each; a client that believes they have one sends everything to shard
/// 0, which forwards each request to its copyset's shard through the channel mesh: copysets
/// are created where they belong, and writes and reads work either way.
#[test]
fn requests_that_reach_the_wrong_shard_are_forwarded_to_their_copysets_shard() {
    use dataplane::config::CoreSpec;
    use dataplane::protocol::{decode_copyset_list, Status, LIST_COPYSETS};
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "mem");
            config.node.cores = CoreSpec::List(vec![0, 1]);
            for node in &mut config.cluster.nodes {
                node.shards = 2;
            }
            Node::start_on(config, vec![0, 1])
        })
        .collect();
    let copysets: Vec<CopysetId> = (1..=6).map(CopysetId).collect();
    let owners: Vec<u32> = copysets
        .iter()
        .map(|c| dataplane::protocol::shard_of(*c, 2))
        .collect();
    assert!(
        owners.contains(&1),
        "some copyset lives on shard 1: {owners:?}"
    );
    let wrong_view = common::addresses_with_shards(&ports, "tcp", 1);
    let ids = copysets.clone();
    with_client_of(wrong_view, move |client| {
        Box::pin(async move {
            for (i, copyset) in ids.iter().enumerate() {
                client
                    .create_copyset(*copyset, &[1, 2, 3])
                    .await
                    .expect("create through shard 0");
                client
                    .write(*copyset, ChunkId(i as u64 + 1), 0, block(i as u64), 1)
                    .await
                    .expect("write through shard 0");
            }
        })
    });
    let right_view = common::addresses_with_shards(&ports, "tcp", 2);
    with_client_of(right_view, move |client| {
        Box::pin(async move {
            for (i, copyset) in copysets.iter().enumerate() {
                // The shard that owns it by placement lists it.
                let (status, body) = client
                    .call_node(1, *copyset, LIST_COPYSETS, bytes::Bytes::new())
                    .await
                    .expect("list");
                assert_eq!(status, Status::Ok);
                let listed = decode_copyset_list(&body).expect("list body");
                assert!(
                    listed.contains(&copyset.0),
                    "{copyset} on its shard: {listed:?}"
                );
                let data = client
                    .read(*copyset, ChunkId(i as u64 + 1), 0, 4096)
                    .await
                    .expect("read from the owning shard");
                assert_eq!(data, block(i as u64));
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Wrong input over the wire gets an error and changes nothing: an unknown copyset, writes
/// and reads outside the chunk or unaligned, an older sn, a body that does not decode, an
/// unknown opcode, and a frame that is not a frame (which closes only that connection).
#[test]
fn wrong_input_over_the_wire_gets_an_error_and_changes_nothing() {
    use dataplane::copyset::ChunkOp;
    use dataplane::protocol::{self, Status};
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    let client_port = ports[1];
    with_client(&ports, move |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            client
                .write(COPYSET, ChunkId(5), 0, block(5), 2)
                .await
                .expect("write");
            let leader = client.cached_leader(COPYSET).expect("leader");
            let client = &client;
            let call = |copyset: CopysetId, opcode, body: bytes::Bytes| async move {
                client
                    .call_node(leader, copyset, opcode, body)
                    .await
                    .expect("an answer")
                    .0
            };
            let write = |offset: u32, data: bytes::Bytes, sn: u64| {
                ChunkOp::Write {
                    chunk: ChunkId(5),
                    sn,
                    offset,
                    data,
                }
                .encode()
            };
            // No such copyset.
            assert_eq!(
                call(CopysetId(999), protocol::WRITE_CHUNK, write(0, block(9), 2)).await,
                Status::CopysetNotFound
            );
            // Outside the chunk (1 MiB), unaligned, and an older sn.
            let outside = call(COPYSET, protocol::WRITE_CHUNK, write(1 << 20, block(9), 2)).await;
            assert!(matches!(outside, Status::Invalid(_)), "{outside:?}");
            let unaligned = call(COPYSET, protocol::WRITE_CHUNK, write(100, block(9), 2)).await;
            assert!(matches!(unaligned, Status::Invalid(_)), "{unaligned:?}");
            let older = call(COPYSET, protocol::WRITE_CHUNK, write(0, block(9), 1)).await;
            assert_eq!(older, Status::BackwardSn);
            let read_outside = protocol::ReadChunk {
                chunk: ChunkId(5),
                offset: (1 << 20) - 4096,
                len: 8192,
            }
            .encode();
            let read = call(COPYSET, protocol::READ_CHUNK, read_outside).await;
            assert!(matches!(read, Status::Invalid(_)), "{read:?}");
            // Bodies that do not decode, an operation under the wrong opcode, an unknown
            // opcode.
            let garbage = bytes::Bytes::from_static(&[1, 2, 3]);
            for opcode in [
                protocol::WRITE_CHUNK,
                protocol::READ_CHUNK,
                protocol::CREATE_COPYSET,
            ] {
                let status = call(COPYSET, opcode, garbage.clone()).await;
                assert!(
                    matches!(status, Status::Invalid(_)),
                    "{opcode:?}: {status:?}"
                );
            }
            let mismatched = call(COPYSET, protocol::DELETE_CHUNK, write(0, block(9), 2)).await;
            assert!(matches!(mismatched, Status::Invalid(_)), "{mismatched:?}");
            let unknown = call(COPYSET, dataplane::net::Opcode(250), garbage.clone()).await;
            assert!(matches!(unknown, Status::Invalid(_)), "{unknown:?}");
        })
    });
    // Bytes that are not a frame close that connection only.
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", client_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.write_all(&[0xAB; 64]).expect("send garbage");
        let mut buffer = [0u8; 16];
        let read = stream.read(&mut buffer);
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the server closes a connection that sends no frame: {read:?}"
        );
    }
    with_client(&ports, move |client| {
        Box::pin(async move {
            // Nothing changed, and the nodes serve on.
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(5), 0, 4096)
                    .await
                    .expect("read"),
                block(5)
            );
            let info = client
                .call_node(
                    1,
                    COPYSET,
                    dataplane::protocol::GET_CHUNK_INFO,
                    bytes::Bytes::copy_from_slice(&5u64.to_le_bytes()),
                )
                .await
                .expect("chunk info");
            assert_eq!(&info.1[8..16], &2u64.to_le_bytes(), "the sn stayed 2");
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 25, item 1, from a client: two copysets on the same shards write one new chunk id at
/// the same time, after enough creations that the next one waits for a checkpoint. With both
/// led from node 1, one write wins there and the other is refused with a clear error; no
/// process aborts, and both copysets go on serving. (Followers may order the two creations
/// the other way: chunk ids shared by copysets of one shard stay ambiguous until they are
/// scoped by copyset.)
#[test]
fn two_copysets_creating_one_chunk_id_at_once_get_an_error_not_an_abort() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    let (a, b) = (CopysetId(31), CopysetId(32));
    with_client(&ports, move |client| {
        Box::pin(async move {
            for copyset in [a, b] {
                client
                    .create_copyset(copyset, &[1, 2, 3])
                    .await
                    .expect("create copyset");
            }
            for i in 0..40u64 {
                client
                    .write(a, ChunkId(500 + i), 0, block(i), 1)
                    .await
                    .expect("write");
            }
            client
                .write(b, ChunkId(600), 0, block(0), 1)
                .await
                .expect("write");
            for copyset in [a, b] {
                common::lead_from(&client, copyset, 1).await;
                client.set_peers(copyset, &[1, 2, 3]);
            }
            let shared = ChunkId(77);
            let (first, second) = futures_lite::future::zip(
                client.write(a, shared, 0, block(1), 1),
                client.write(b, shared, 0, block(2), 1),
            )
            .await;
            let (winner, refused) = match (first, second) {
                (Ok(()), Err(error)) => (a, error),
                (Err(error), Ok(())) => (b, error),
                other => panic!("exactly one creation wins: {other:?}"),
            };
            let text = refused.to_string();
            assert!(
                text.contains("belongs to copyset") || text.contains("created the chunk"),
                "{text}"
            );
            let expected = if winner == a { block(1) } else { block(2) };
            assert_eq!(
                client.read(winner, shared, 0, 4096).await.expect("read"),
                expected
            );
            // Both copysets serve on.
            for copyset in [a, b] {
                client
                    .write(copyset, ChunkId(copyset.0 * 100), 0, block(3), 1)
                    .await
                    .expect("write after");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 25, item 10: the data directory a node creates and its device image are its user's
/// alone (0700 and 0600), not world-readable.
#[test]
fn the_files_a_node_creates_are_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let data = dir.path().join("fresh").join("node1");
    let mut node = Node::start(config(1, &ports, &data, "uring"));
    let image = data.join("node1.img");
    let started = Instant::now();
    while !image.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "no image made");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&image), 0o600, "the device image");
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(
        mode(&dir.path().join("fresh")),
        0o700,
        "a directory made on the way"
    );
    node.stop();
}

/// Issue 25, item 8: raft frames are taken on the peer port only, and only from nodes of the
/// cluster's configuration. An append forged as node 7 (no such node) with a far higher term
/// neither on the client port nor on the peer port reaches raft: the leader keeps its term.
#[test]
fn raft_frames_from_outside_the_cluster_or_on_a_client_port_are_dropped() {
    use dataplane::protocol::{RaftBatch, Status, RAFT};
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
                .write(COPYSET, ChunkId(5), 0, block(1), 1)
                .await
                .expect("write");
            common::lead_from(&client, COPYSET, 1).await;
        })
    });
    let forged = || {
        let message = raftcore::Message::new(
            raftcore::MessageType::Append,
            raftcore::NodeId(7),
            raftcore::NodeId(1),
            raftcore::Term(1000),
        );
        RaftBatch {
            messages: vec![(COPYSET.0, raftcore::encode_to_bytes(&message))],
        }
        .encode()
    };
    with_client(&ports, move |client| {
        Box::pin(async move {
            let (status, _) = client
                .call_node(1, COPYSET, RAFT, forged())
                .await
                .expect("an answer from the client port");
            assert!(matches!(status, Status::Invalid(_)), "{status:?}");
        })
    });
    // The peer port, reached as a client would: node 1's address is its peer listener.
    let peer = vec![dataplane::client::NodeAddress {
        id: 1,
        endpoint: format!("tcp://127.0.0.1:{}", ports[0])
            .parse()
            .expect("endpoint"),
        shards: 1,
    }];
    with_client_of(peer, move |client| {
        Box::pin(async move {
            let (status, _) = client
                .call_node(1, COPYSET, RAFT, forged())
                .await
                .expect("an answer from the peer port");
            assert!(matches!(status, Status::Ok), "{status:?}");
        })
    });
    with_client(&ports, |client| {
        Box::pin(async move {
            let status = client.copyset_status(1, COPYSET).await.expect("status");
            assert_eq!(status.role, 3, "node 1 still leads: {status:?}");
            assert!(
                status.term < 1000,
                "the forged term reached raft: {status:?}"
            );
            client.set_peers(COPYSET, &[1, 2, 3]);
            let data = client
                .read(COPYSET, ChunkId(5), 0, 4096)
                .await
                .expect("read");
            assert_eq!(data, block(1));
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
