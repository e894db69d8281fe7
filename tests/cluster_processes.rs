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

/// Runs `body` on a client executor.
fn with_client<T: Send + 'static>(
    ports: &[u16],
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let addresses: Vec<NodeAddress> = (0..3)
        .map(|n| NodeAddress {
            id: n as u64 + 1,
            endpoint: format!("tcp://127.0.0.1:{}", ports[2 * n + 1])
                .parse()
                .expect("endpoint"),
            shards: 1,
        })
        .collect();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("process-test-client")
        .spawn(move || async move {
            let config = ClientConfig {
                deadline: Duration::from_secs(30),
                ..ClientConfig::default()
            };
            let client = Client::new(&addresses, config);
            client.set_peers(COPYSET, &[1, 2, 3]);
            body(client).await
        })
        .expect("client executor")
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
