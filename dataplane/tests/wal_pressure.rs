//! Liveness under WAL pressure: three chunkservers on loopback in this process, each with one
//! shard whose WAL ring is shared by several copysets. Whatever fills the ring, every copyset
//! whose majority is up must keep electing leaders and taking writes, and every acknowledged
//! write must read back.

mod common;

use std::time::{Duration, Instant};

use common::{config, free_ports, with_client, Node};
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
async fn every_copyset_led(client: &Client, copysets: &[CopysetId], bound: Duration) {
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
            "not every copyset is led after {bound:?}: {missing:?}"
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
            every_copyset_led(&client, &[IDLE, BUSY], Duration::from_secs(10)).await;
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
