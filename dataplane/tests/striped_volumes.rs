//! Striped volumes on three in-process chunkservers: the pool is planned by the metadata
//! copyset over labelled nodes (refused, with nothing written, when the labels cannot keep
//! replicas on distinct hosts), created and marked ready; a volume's segments get copysets on
//! their first write only (a read of a hole allocates nothing), racing first writes agree on
//! one allocation, and the map outlives the metadata copyset's leader.

mod common;

use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use common::{block, config, free_ports, with_client, Node};
use dataplane::nbd::Export;
use dataplane::placement::tables::{PoolMember, PoolState};
use dataplane::volume::pool::{
    allocate_segment, create_striped_volume, ensure_pool, read_pool, read_segment, PoolSettings,
};
use dataplane::volume::{
    delete_volume, ensure_metadata_copyset, find_volume, list_volumes, Volume, VolumeError,
};
use dataplane::volume_table::{TableError, VolumeLayout, METADATA_COPYSET};

const MIB: u64 = 1 << 20;
/// Four 1 MiB chunks per segment.
const SEGMENT: u64 = 4 * MIB;

fn settings(host: impl Fn(u64) -> String) -> PoolSettings {
    PoolSettings {
        replicas: 3,
        copysets_per_node: 4,
        members: (1..=3)
            .map(|node| PoolMember {
                node,
                zone: host(node),
                host: host(node),
            })
            .collect(),
    }
}

/// A page of `value`s distinct per offset, two pages long, to cross a chunk boundary.
fn two_pages(value: u64) -> Bytes {
    let mut data = block(value).to_vec();
    data.extend_from_slice(&block(value + 1));
    Bytes::from(data)
}

#[test]
fn striped_volumes_allocate_segments_on_first_write_over_a_placed_pool() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    let (leader, id) = with_client(&ports, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            // Three nodes on one host cannot hold three replicas apart: refused, nothing kept.
            let refused = ensure_pool(&client, &settings(|_| "one-host".into())).await;
            assert!(
                matches!(&refused, Err(VolumeError::Table(TableError::Invalid(e))) if e.contains("hosts")),
                "{refused:?}"
            );
            assert!(read_pool(&client).await.expect("read the pool").is_empty());
            let pool = ensure_pool(&client, &settings(|n| format!("host-{n}")))
                .await
                .expect("the pool");
            assert_eq!(pool.len(), 4, "4 per node × 3 nodes / 3 replicas");
            for copyset in &pool {
                assert_eq!(copyset.state, PoolState::Ready);
                let distinct: BTreeSet<u64> = copyset.peers.iter().copied().collect();
                assert_eq!(distinct.len(), 3);
            }
            assert_eq!(
                ensure_pool(&client, &settings(|n| format!("other-{n}")))
                    .await
                    .expect("again"),
                pool,
                "the pool is planned once"
            );

            let volume = create_striped_volume(&client, "s", 32 * MIB, SEGMENT)
                .await
                .expect("create");
            let VolumeLayout::Striped { id, .. } = volume.layout else {
                panic!("not striped: {volume:?}");
            };
            for (name, size, segment) in [
                ("s", 4096, SEGMENT),
                ("t", 0, SEGMENT),
                ("t", 4096, 3 * MIB / 2),
            ] {
                let refused = create_striped_volume(&client, name, size, segment).await;
                assert!(
                    matches!(
                        refused,
                        Err(VolumeError::Table(
                            TableError::Exists(_) | TableError::Invalid(_)
                        ))
                    ),
                    "{name} {size} {segment}: {refused:?}"
                );
            }
            assert_eq!(list_volumes(&client).await.expect("list").len(), 1);

            let handle = Volume::new(volume.clone(), Rc::clone(&client));
            handle.write(0, block(1), false).await.expect("segment 0");
            // Across the boundary of chunks 21 and 22, in segment 5.
            handle
                .write(22 * MIB - 4096, two_pages(50), false)
                .await
                .expect("segment 5");
            assert!(handle
                .read(9 * MIB, 4096)
                .await
                .expect("a hole")
                .iter()
                .all(|b| *b == 0));
            assert!(
                read_segment(&client, id, 2)
                    .await
                    .expect("segment 2")
                    .is_none(),
                "reads allocate nothing"
            );
            let first = read_segment(&client, id, 0)
                .await
                .expect("segment 0")
                .expect("allocated");
            let distinct: BTreeSet<_> = first.copysets.iter().collect();
            assert_eq!(
                distinct.len(),
                4,
                "a segment's chunks spread over the pool: {first:?}"
            );

            // Two writers race to a new segment: both succeed on one allocation.
            let racers: Vec<_> = (0..2u64)
                .map(|i| {
                    let client = Rc::clone(&client);
                    let volume = volume.clone();
                    glommio::spawn_local(async move {
                        let own = Volume::new(volume, client);
                        own.write(28 * MIB + i * 4096, block(70 + i), false).await
                    })
                })
                .collect();
            for racer in racers {
                racer.await.expect("a racing first write");
            }
            let raced = allocate_segment(&client, id, 7).await.expect("segment 7");
            assert_eq!(
                read_segment(&client, id, 7).await.expect("read").as_ref(),
                Some(&raced)
            );
            (client.cached_leader(METADATA_COPYSET).expect("leader"), id)
        })
    });
    // The metadata copyset's leader stops: another client finds the same map and data.
    nodes[leader as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            client.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            let started = std::time::Instant::now();
            let volume = loop {
                match find_volume(&client, "s").await {
                    Ok(volume) => break volume,
                    Err(error) => assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "no new leader serves the table: {error}"
                    ),
                }
            };
            for copyset in read_pool(&client).await.expect("pool") {
                client.set_peers(copyset.copyset, &copyset.peers);
            }
            let handle = Volume::new(volume, Rc::clone(&client));
            assert_eq!(handle.read(0, 4096).await.expect("read"), block(1));
            assert_eq!(
                handle.read(22 * MIB - 4096, 8192).await.expect("read"),
                two_pages(50)
            );
            assert_eq!(
                handle.read(28 * MIB + 4096, 4096).await.expect("read"),
                block(71)
            );
            let allocated: Vec<u64> = handle.cached_segments().iter().map(|s| s.segment).collect();
            assert_eq!(allocated, vec![0, 5, 7]);
            assert!(read_segment(&client, id, 1)
                .await
                .expect("segment 1")
                .is_none());

            // Deleted with its chunks and its segment table; a new volume never reuses its id.
            let first = read_segment(&client, id, 0)
                .await
                .expect("read")
                .expect("segment 0");
            delete_volume(&client, "s").await.expect("delete");
            assert!(read_segment(&client, id, 0).await.expect("read").is_none());
            let chunk = dataplane::placement::chunk_id(id, 0).expect("id");
            let bytes = client
                .read(first.copysets[0], chunk, 0, 4096)
                .await
                .expect("read");
            assert!(
                bytes.iter().all(|b| *b == 0),
                "a deleted volume's chunk reads as zeros"
            );
            let again = create_striped_volume(&client, "s", 32 * MIB, SEGMENT)
                .await
                .expect("create again");
            assert!(
                matches!(again.layout, VolumeLayout::Striped { id: new, .. } if new != id),
                "{again:?} reuses id {id}"
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
