//! Scrub (issue 22): three chunkservers on loopback with their chunks in files; bytes flipped
//! in one replica's file are found by a scrub that runs while the copyset is written to, named
//! by node, chunk and offset, and repaired from the majority; a repair never undoes a write
//! that came after the scrub.

mod common;

use bytes::Bytes;
use common::{config, free_ports, with_client, Node};
use dataplane::client::scrub::{ScrubOptions, RANGE_BYTES};
use dataplane::copyset::ChunkOp;
use dataplane::ids::{ChunkId, CopysetId};

const COPYSET: CopysetId = CopysetId(9);
const PAGE: usize = 4096;

/// A page no other page of the test has: its chunk, page number and a seed in every word.
fn page(chunk: u64, number: u64, seed: u64) -> Bytes {
    let mut data = vec![0u8; PAGE];
    for (i, word) in data.chunks_exact_mut(8).enumerate() {
        let value =
            (chunk << 48) ^ (number << 32) ^ (seed << 16) ^ i as u64 ^ 0x5eed_0000_0000_0000;
        word.copy_from_slice(&value.to_le_bytes());
    }
    Bytes::from(data)
}

/// Flips a byte in the chunk area's copy of `wanted` in `image`: the last page-aligned copy
/// (chunk slots lie after the WAL ring, which holds the same bytes inside a raft entry).
fn flip_page_in(image: &std::path::Path, wanted: &[u8]) -> u64 {
    let bytes = std::fs::read(image).expect("read the image");
    let at = bytes
        .chunks_exact(PAGE)
        .enumerate()
        .rev()
        .find(|(_, p)| *p == wanted)
        .map(|(i, _)| i * PAGE)
        .expect("the page is in the image");
    // One byte written in place: the node has the file open.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open the image");
    std::os::unix::fs::FileExt::write_at(&file, &[bytes[at + 100] ^ 0xff], (at + 100) as u64)
        .expect("flip a byte");
    at as u64
}

#[test]
fn a_flipped_page_is_found_named_and_repaired_from_the_majority() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    let options = ScrubOptions {
        repair: false,
        bytes_per_s: 0,
    };
    // Two chunks of 32 pages each.
    with_client(&ports, move |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for chunk in 1..=2u64 {
                for n in 0..32u64 {
                    client
                        .write(
                            COPYSET,
                            ChunkId(chunk),
                            (n as usize * PAGE) as u32,
                            page(chunk, n, 0),
                            1,
                        )
                        .await
                        .expect("write");
                }
            }
            let clean = client
                .scrub_copyset(COPYSET, options, |_, _| {})
                .await
                .expect("scrub");
            assert!(clean.is_clean(), "{clean:?}");
            assert_eq!(clean.chunks, 2);
            assert_eq!(clean.voters, vec![1, 2, 3]);
            assert!(clean.bytes >= 2 * u64::from(RANGE_BYTES).min(1 << 20));
        })
    });

    // Node 2's copy of chunk 1, page 5 goes bad on its disk.
    let flipped = flip_page_in(&dir.path().join("node2.img"), &page(1, 5, 0));
    assert!(flipped > 0);

    with_client(&ports, move |client| {
        Box::pin(async move {
            let found = client
                .scrub_copyset(COPYSET, options, |_, _| {})
                .await
                .expect("scrub");
            assert!(!found.is_clean(), "the flip went unseen: {found:?}");
            assert_eq!(found.bad_pages.len(), 1, "{found:?}");
            let bad = &found.bad_pages[0];
            assert_eq!((bad.node, bad.chunk, bad.offset), (2, 1, 5 * PAGE as u64));
            assert_eq!(bad.good, crc32c::crc32c(&page(1, 5, 0)));
            assert!(!bad.repaired);

            // A repair entry whose bad sum no replica has changes nothing: what a write made
            // after the scrub looks like to it.
            client
                .apply(
                    COPYSET,
                    &ChunkOp::Repair {
                        chunk: ChunkId(1),
                        offset: (6 * PAGE) as u32,
                        data: page(9, 9, 9),
                        bad: 0x1234_5678,
                    },
                )
                .await
                .expect("a repair that matches nothing");
            let read = client
                .read(COPYSET, ChunkId(1), 6 * PAGE as u64, PAGE as u32)
                .await
                .expect("read");
            assert_eq!(
                read,
                page(1, 6, 0),
                "a repair changed a page it did not match"
            );

            let repaired = client
                .scrub_copyset(
                    COPYSET,
                    ScrubOptions {
                        repair: true,
                        ..options
                    },
                    |_, _| {},
                )
                .await
                .expect("scrub and repair");
            assert_eq!(repaired.repaired, 1, "{repaired:?}");
            assert!(repaired.is_clean(), "{repaired:?}");
            let again = client
                .scrub_copyset(COPYSET, options, |_, _| {})
                .await
                .expect("scrub after the repair");
            assert!(again.is_clean() && again.bad_pages.is_empty(), "{again:?}");
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// The placement service's background scrub finds and repairs the same damage by itself, with
/// nobody asking: a manual scrub that only looks sees the replicas agree again within a bound.
#[test]
fn the_background_scrub_repairs_a_flipped_page_by_itself() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "uring");
            config.placement.heartbeat_ms = 200;
            config.placement.scrub_mib_per_s = 64;
            config.placement.scrub_every_ms = 1000;
            Node::start(config)
        })
        .collect();
    let look = ScrubOptions {
        repair: false,
        bytes_per_s: 0,
    };
    with_client(&ports, move |client| {
        Box::pin(async move {
            // The placement service is the metadata copyset's leader.
            client
                .create_copyset(dataplane::volume_table::METADATA_COPYSET, &[1, 2, 3])
                .await
                .expect("create the metadata copyset");
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for n in 0..16u64 {
                client
                    .write(
                        COPYSET,
                        ChunkId(3),
                        (n as usize * PAGE) as u32,
                        page(3, n, 1),
                        1,
                    )
                    .await
                    .expect("write");
            }
        })
    });
    // Paused, the service scrubs nothing: the damage stays for a look to see it.
    with_client(&ports, move |client| {
        Box::pin(async move {
            dataplane::volume::pool::set_scheduler_paused(&client, true)
                .await
                .expect("pause the scheduler");
        })
    });
    flip_page_in(&dir.path().join("node3.img"), &page(3, 7, 1));
    with_client(&ports, move |client| {
        Box::pin(async move {
            let damaged = client
                .scrub_copyset(COPYSET, look, |_, _| {})
                .await
                .expect("scrub");
            assert_eq!(damaged.bad_pages.len(), 1, "{damaged:?}");
            assert_eq!(damaged.bad_pages[0].node, 3, "{damaged:?}");
            dataplane::volume::pool::set_scheduler_paused(&client, false)
                .await
                .expect("resume the scheduler");
            let began = std::time::Instant::now();
            loop {
                let report = client
                    .scrub_copyset(COPYSET, look, |_, _| {})
                    .await
                    .expect("scrub");
                if report.is_clean() && report.bad_pages.is_empty() {
                    break;
                }
                assert!(
                    began.elapsed() < std::time::Duration::from_secs(60),
                    "the background scrub did not repair: {report:?}"
                );
                glommio::timer::sleep(std::time::Duration::from_millis(300)).await;
            }
            let read = client
                .read(COPYSET, ChunkId(3), 7 * PAGE as u64, PAGE as u32)
                .await
                .expect("read");
            assert_eq!(read, page(3, 7, 1));
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
