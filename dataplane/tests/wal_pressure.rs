//! Liveness under WAL pressure: three chunkservers on loopback in this process, each with one
//! shard whose WAL ring is shared by several copysets. Whatever fills the ring, every copyset
//! whose majority is up must keep electing leaders and taking writes, and every acknowledged
//! write must read back.

mod common;

use std::time::{Duration, Instant};

use common::{
    addresses_of_cluster, config, config_of_cluster, free_ports, with_client, with_client_of, Node,
};
use dataplane::client::Client;
use dataplane::ids::{ChunkId, CopysetId};

/// Copysets that take no writes while the ring fills.
const IDLE: CopysetId = CopysetId(11);
/// The copyset that fills the ring.
const BUSY: CopysetId = CopysetId(12);

/// 64 KiB of a pattern drawn from `seed`.
fn payload(seed: u64) -> bytes::Bytes {
    let mut data = vec![0u8; 64 << 10];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u64 / 512)) as u8;
    }
    data[..8].copy_from_slice(&seed.to_le_bytes());
    bytes::Bytes::from(data)
}

/// Where write `i` to `copyset` lands: 16 chunks of 1 MiB (ids of the copyset's own), 16
/// places each.
fn place(copyset: CopysetId, i: u64) -> (ChunkId, u32) {
    (
        ChunkId(copyset.0 * 1000 + i % 16),
        ((i / 16) % 16) as u32 * (64 << 10),
    )
}

/// `count` writes of 64 KiB to `copyset`, from write `first` on.
async fn fill(client: &Client, copyset: CopysetId, first: u64, count: u64) {
    for i in first..first + count {
        let (chunk, offset) = place(copyset, i);
        client
            .write(copyset, chunk, offset, payload(i), 1)
            .await
            .unwrap_or_else(|e| panic!("write {i} to copyset {copyset}: {e}"));
    }
}

/// Reads back the last write to each place among writes `..end`.
async fn check(client: &Client, copyset: CopysetId, end: u64) {
    for i in end.saturating_sub(256)..end {
        let (chunk, offset) = place(copyset, i);
        let data = client
            .read(copyset, chunk, u64::from(offset), 64 << 10)
            .await
            .unwrap_or_else(|e| panic!("read {i} of copyset {copyset}: {e}"));
        assert!(
            data == payload(i),
            "write {i} of copyset {copyset} reads back"
        );
    }
}

/// Waits until each of `copysets` has exactly one leader that all three nodes agree on, and
/// equal applied indexes; panics after `bound`.
async fn every_copyset_led(
    client: &Client,
    copysets: &[CopysetId],
    bound: Duration,
    status_ports: &[u16],
) {
    let began = Instant::now();
    loop {
        let mut missing = Vec::new();
        for copyset in copysets {
            let mut leaders = Vec::new();
            let mut applied = Vec::new();
            for node in 1..=3u64 {
                match client.copyset_status(node, *copyset).await {
                    Ok(status) => {
                        if status.role == 3 {
                            leaders.push(node);
                        }
                        applied.push(status.applied);
                    }
                    Err(error) => missing.push(format!("{copyset} on {node}: {error}")),
                }
            }
            let converged = applied.len() == 3 && applied.iter().all(|a| *a == applied[0]);
            if leaders.len() != 1 || !converged {
                missing.push(format!(
                    "copyset {copyset}: leaders {leaders:?}, applied {applied:?}"
                ));
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            began.elapsed() < bound,
            "not every copyset is led after {bound:?}: {missing:?}{}",
            statuses_of(status_ports)
        );
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// The brick of issue 17: after a restart, an idle copyset's last entry is the no-op its new
/// leader appended. That entry is applied without touching a chunk; the shard's WAL must still
/// learn that it is applied, or it pins the ring's head, the ring fills with the busy
/// copyset's writes, and no copyset on the shard can persist a vote again.
#[test]
fn an_idle_copyset_whose_last_entry_is_a_no_op_does_not_pin_the_wal() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let start = |dir: &std::path::Path| -> Vec<Node> {
        (1..=3)
            .map(|id| Node::start(config(id, &ports, dir, "uring")))
            .collect()
    };
    let mut nodes = start(dir.path());
    with_client(&ports, |client| {
        Box::pin(async move {
            for copyset in [IDLE, BUSY] {
                client
                    .create_copyset(copyset, &[1, 2, 3])
                    .await
                    .expect("create copyset");
                fill(&client, copyset, 0, 8).await;
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
    let mut nodes = start(dir.path());
    with_client(&ports, |client| {
        Box::pin(async move {
            for copyset in [IDLE, BUSY] {
                client.set_peers(copyset, &[1, 2, 3]);
            }
            // The idle copyset elects a leader, whose no-op is its last entry; then it rests.
            check(&client, IDLE, 8).await;
            glommio::timer::sleep(Duration::from_millis(1500)).await;
            // Three times the 16 MiB ring through the busy copyset.
            fill(&client, BUSY, 8, 768).await;
            every_copyset_led(&client, &[IDLE, BUSY], Duration::from_secs(10), &[]).await;
            check(&client, BUSY, 776).await;
            check(&client, IDLE, 8).await;
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 25, item 2: a request that cannot be carried out is refused before it is proposed,
/// never accepted to fail its persist and stall the copyset on every replica: a write that is
/// not page-aligned (the case: 4 MiB less a byte), and one larger than this shard's
/// ring could ever take beside the room raft keeps (a 16 MiB ring takes under 1.5 MiB at
/// once). Each is refused at once with a clear error, and writes go on.
#[test]
fn requests_that_cannot_be_carried_out_are_refused_before_they_stall_a_copyset() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "mem");
            config.storage.chunk_size = dataplane::config::ByteSize(8 << 20);
            Node::start(config)
        })
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(BUSY, &[1, 2, 3])
                .await
                .expect("create copyset");
            let chunk = ChunkId(5);
            let cases: [(usize, Option<&str>); 7] = [
                (1 << 20, None),
                // The case: a whole 4 MiB frame, its data not page-aligned.
                ((4 << 20) - 26, Some("not aligned")),
                ((4 << 20) - 1, Some("exceeds the frame limit")),
                (4097, Some("not aligned")),
                ((4 << 20) - 4096, Some("never fits this shard's WAL")),
                (2 << 20, Some("never fits this shard's WAL")),
                ((1 << 20) + 4096, None),
            ];
            for (len, refusal) in cases {
                let data = bytes::Bytes::from(vec![0x5a; len]);
                let began = Instant::now();
                let result = client.write(BUSY, chunk, 0, data, 1).await;
                match (refusal, &result) {
                    (None, Ok(())) => {}
                    (Some(expected), Err(error)) => {
                        let text = error.to_string();
                        assert!(text.contains(expected), "{len}: {text}");
                        assert!(
                            began.elapsed() < Duration::from_secs(2),
                            "{len}: refused at once, not after retries"
                        );
                    }
                    _ => panic!("a write of {len} bytes: {result:?}"),
                }
            }
            // The copyset did not stall.
            for i in 0..32u64 {
                let offset = (i % 16) as u32 * (64 << 10);
                client
                    .write(BUSY, chunk, offset, payload(i), 1)
                    .await
                    .unwrap_or_else(|e| panic!("write {i} after the refusals: {e}"));
            }
            for i in 16..32u64 {
                let offset = u64::from((i % 16) as u32 * (64 << 10));
                let data = client
                    .read(BUSY, chunk, offset, 64 << 10)
                    .await
                    .expect("read");
                assert!(data == payload(i), "write {i} reads back");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 25, item 6 (and issue 17): a copyset that lost its quorum keeps entries it can never
/// apply at the head of a node's ring, while another copyset led by that node writes three
/// rings' worth through it. Checkpoints move the stuck entries forward instead of letting them
/// pin the head, so the busy copyset never stalls; once the lost nodes return, the stuck
/// copyset commits and is led again.
#[test]
fn a_copyset_without_quorum_does_not_pin_its_nodes_rings() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(13);
    // The metrics endpoints of nodes 3, 4 and 5.
    let metrics = [ports[10], ports[11], ports[12]];
    let start = |id: u32| {
        let mut config = config_of_cluster(id, 5, &ports, dir.path(), "uring", "tcp");
        if id >= 3 {
            config.metrics.address = Some(([127, 0, 0, 1], metrics[id as usize - 3]).into());
        }
        Node::start(config)
    };
    let mut nodes: Vec<Node> = (1..=5).map(start).collect();
    let addresses = addresses_of_cluster(5, &ports, "tcp", 1);
    // IDLE stands for the stuck copyset here: on nodes 3, 4 and 5. Both copysets are led by
    // node 3.
    let stuck = IDLE;
    with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            client
                .create_copyset(stuck, &[3, 4, 5])
                .await
                .expect("create the stuck copyset");
            client
                .create_copyset(BUSY, &[1, 2, 3])
                .await
                .expect("create the busy copyset");
            for copyset in [stuck, BUSY] {
                fill(&client, copyset, 0, 4).await;
                common::lead_from(&client, copyset, 3).await;
            }
        })
    });
    // Node 4 goes; writes stream to the stuck copyset while node 5 goes too, so its leader
    // appends entries it can never commit before it notices the lost quorum.
    nodes[3].stop();
    let streaming = {
        let addresses = addresses.clone();
        std::thread::spawn(move || {
            with_client_of(addresses, move |client| {
                Box::pin(async move {
                    client.set_peers(stuck, &[3]);
                    let client = std::rc::Rc::new(client);
                    let began = Instant::now();
                    let mut i = 4;
                    while began.elapsed() < Duration::from_millis(1500) {
                        let (chunk, offset) = place(stuck, i);
                        let client = std::rc::Rc::clone(&client);
                        glommio::spawn_local(async move {
                            // Acknowledged or not: only what the leader appended matters.
                            let _ = client.write(stuck, chunk, offset, payload(i), 1).await;
                        })
                        .detach();
                        i += 1;
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    nodes[4].stop();
    streaming.join().expect("stream");
    // Node 3 holds entries of the stuck copyset above its applied index: they can only be
    // applied once a quorum returns.
    let wal_of = |copyset: u64| wal_status(metrics[0], copyset);
    let pinned = wal_of(stuck.0);
    assert!(
        pinned["log_last"].as_u64() > pinned["log_applied"].as_u64(),
        "the stuck copyset must hold entries it cannot apply: {pinned}"
    );
    with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            // Three rings' worth through the busy copyset, led by node 3.
            client.set_peers(BUSY, &[1, 2, 3]);
            fill(&client, BUSY, 4, 768).await;
            check(&client, BUSY, 772).await;
        })
    });
    // The stuck entries are still there, moved forward past where they first stood.
    let after = wal_of(stuck.0);
    assert_eq!(after["log_last"], pinned["log_last"], "{after}");
    assert!(
        after["first_needed_lsn"].as_u64() > pinned["first_needed_lsn"].as_u64(),
        "the stuck entries moved forward: before {pinned}, after {after}"
    );
    nodes[3] = start(4);
    nodes[4] = start(5);
    with_client_of(addresses, move |client| {
        Box::pin(async move {
            client.set_peers(stuck, &[3, 4, 5]);
            check(&client, stuck, 4).await;
            let bound = Duration::from_secs(10);
            every_copyset_led_on(&client, stuck, &[3, 4, 5], bound, &metrics).await;
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Waits until `copyset` has one leader among `nodes` and equal applied indexes there.
async fn every_copyset_led_on(
    client: &Client,
    copyset: CopysetId,
    nodes: &[u64],
    bound: Duration,
    status_ports: &[u16],
) {
    let began = Instant::now();
    loop {
        let mut statuses = Vec::new();
        for node in nodes {
            if let Ok(status) = client.copyset_status(*node, copyset).await {
                statuses.push(status);
            }
        }
        let leaders = statuses.iter().filter(|s| s.role == 3).count();
        if statuses.len() == nodes.len()
            && leaders == 1
            && statuses.iter().all(|s| s.applied == statuses[0].applied)
        {
            return;
        }
        assert!(
            began.elapsed() < bound,
            "copyset {copyset} not led: {statuses:?}{}",
            statuses_of(status_ports)
        );
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// A follower that was down while the others wrote less than the WAL's recent history
/// (`WalBudget::retention`: a quarter of what client data may fill) catches up from the
/// leader's log when it returns — even though the leader ran checkpoints meanwhile — rather
/// than by a copy of the copyset's chunks, which would keep it unable to persist anything
/// for as long as the copy takes.
#[test]
fn a_follower_briefly_down_catches_up_from_the_log_not_by_a_copy_of_the_chunks() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let metrics = [ports[6], ports[7]];
    let start = |id: u32| {
        let mut config = config(id, &ports, dir.path(), "uring");
        // A 64 MiB ring: a checkpoint is due at about 24 MiB, 12 MiB of history stay.
        config.storage.wal_size_per_shard = dataplane::config::ByteSize(64 << 20);
        if let Some(device) = config.devices.first_mut() {
            device.size = Some(dataplane::config::ByteSize(128 << 20));
        }
        match id {
            1 => config.metrics.address = Some(([127, 0, 0, 1], metrics[0]).into()),
            3 => config.metrics.address = Some(([127, 0, 0, 1], metrics[1]).into()),
            _ => {}
        }
        Node::start(config)
    };
    let mut nodes: Vec<Node> = (1..=3).map(start).collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(BUSY, &[1, 2, 3])
                .await
                .expect("create the copyset");
            common::lead_from(&client, BUSY, 1).await;
        })
    });
    // 16 MiB with every node up, then 10 MiB with node 3 down: the leader's ring passes the
    // point where a checkpoint is due while node 3 is away.
    write_range(&ports, 0..16);
    nodes[2].stop();
    let wal_of = |port: u16| wal_status(port, BUSY.0);
    let before = wal_of(metrics[0]);
    write_range(&ports, 16..26);
    let after = wal_of(metrics[0]);
    assert!(
        after["head"].as_u64() > before["head"].as_u64(),
        "the leader ran a checkpoint while node 3 was down: before {before}, after {after}"
    );
    assert!(
        after["log_first"].as_u64() > Some(1),
        "the leader compacted its log: {after}"
    );
    nodes[2] = start(3);
    with_client(&ports, move |client| {
        Box::pin(async move {
            every_copyset_led(&client, &[BUSY], Duration::from_secs(10), &metrics).await;
        })
    });
    let installs = common::http_get(metrics[1], "/metrics")
        .lines()
        .find(|line| line.starts_with("chunkserver_snapshot_installs_total"))
        .map(|line| line.to_string());
    assert!(
        installs.as_deref().is_none_or(|line| line.ends_with(" 0")),
        "node 3 caught up by a copy of the chunks: {installs:?}"
    );
    with_client(&ports, |client| {
        Box::pin(async move {
            client.set_peers(BUSY, &[1, 2, 3]);
            // Node 3 leads and serves what was written while it was away.
            common::lead_from(&client, BUSY, 3).await;
            for i in 18..26 {
                let data = client
                    .read(BUSY, ChunkId(BUSY.0 * 1000 + i % 8), 0, 1 << 20)
                    .await
                    .unwrap_or_else(|e| panic!("read {i}: {e}"));
                assert!(data == big(i), "write {i} reads back from node 3");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// 1 MiB for write `i` of the catch-up test (the test cluster's chunks are 1 MiB).
fn big(i: u64) -> bytes::Bytes {
    let mut data = vec![(i % 251) as u8; 1 << 20];
    data[..8].copy_from_slice(&i.to_le_bytes());
    bytes::Bytes::from(data)
}

/// Writes `range` of the catch-up test, 1 MiB each over 8 chunks of the busy copyset.
fn write_range(ports: &[u16], range: std::ops::Range<u64>) {
    with_client(ports, move |client| {
        Box::pin(async move {
            client.set_peers(BUSY, &[1, 2, 3]);
            for i in range {
                client
                    .write(BUSY, ChunkId(BUSY.0 * 1000 + i % 8), 0, big(i), 1)
                    .await
                    .unwrap_or_else(|e| panic!("write {i}: {e}"));
            }
        })
    });
}

/// The `wal` object of `copyset` in the `/status` of the node whose metrics listen on `port`.
/// The `/status` pages of the nodes whose metrics endpoints are `ports`, for a failure's
/// message: the raft view (each follower's progress on the leader) says why one lags.
fn statuses_of(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| {
            let connections: Vec<String> = common::http_get(*port, "/metrics")
                .lines()
                .filter(|l| l.starts_with("chunkserver_peer") || l.starts_with("chunkserver_conn"))
                .map(str::to_string)
                .collect();
            format!(
                "\n/status on :{port}: {}\nconnections on :{port}: {connections:?}",
                common::http_get(*port, "/status")
            )
        })
        .collect()
}

fn wal_status(port: u16, copyset: u64) -> serde_json::Value {
    let status = common::http_get(port, "/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let mut found = None;
    let mut stack = vec![&status];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("copyset").and_then(|c| c.as_u64()) == Some(copyset) {
                    found = map.get("wal").cloned();
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found.expect("the copyset's WAL status")
}
