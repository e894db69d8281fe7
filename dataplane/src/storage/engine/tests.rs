use super::*;
use crate::storage::bdev::AnyBdev;
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::table::ChunkId;
use crate::storage::test_device;
use crate::storage::wal::record::CopysetId;
use crate::storage::StorageError;
use bytes::Bytes;
use futures_lite::future::block_on;
use raftcore::EntryKind;
use raftcore::{
    Entry, HardState, LogIndex, LogStorage, NodeId, SnapshotMeta, StorageError as RaftStorageError,
    Term,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::rc::Rc;

const PAGE: u64 = 4096;
const CHUNK: u64 = 64 << 10;

pub(crate) fn small_options() -> FormatOptions {
    FormatOptions {
        page_size: PAGE as u32,
        chunk_size: CHUNK,
        wal_size: 256 << 10,
        shard_count: 1,
        max_copysets: 8,
        device_is_zeroed: true,
    }
}

fn device(size: u64) -> Rc<AnyBdev> {
    test_device::device(size)
}

async fn formatted(size: u64) -> Rc<AnyBdev> {
    let bdev = device(size);
    format(&*bdev, &small_options(), [1; 16]).await.unwrap();
    bdev
}

async fn open(bdev: &Rc<AnyBdev>) -> (ShardEngine<AnyBdev>, Recovery) {
    ShardEngine::open(Rc::clone(bdev), 0, EngineOptions::default())
        .await
        .unwrap()
}

fn buffer(engine: &ShardEngine<AnyBdev>, len: u64, fill: u8) -> DmaBuf {
    let mut buf = engine.bdev().alloc(len as usize).unwrap();
    buf.as_mut_slice().unwrap().fill(fill);
    buf
}

#[test]
fn a_formatted_device_opens_empty_and_a_bad_superblock_is_refused() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, recovery) = open(&bdev).await;
        assert_eq!(recovery.chunks, 0);
        assert!(recovery.copysets.is_empty());
        assert!(engine.layout().slots > 10);
        drop(engine);

        let refuse = |bdev: Rc<AnyBdev>| async move {
            ShardEngine::open(bdev, 0, EngineOptions::default())
                .await
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let error = refuse(device(8 << 20)).await;
        assert!(error.contains("not formatted"), "{error}");
        let damaged = test_device::changed_copy(&bdev, |image| image[30] ^= 0x10).await;
        let error = refuse(damaged).await;
        assert!(error.contains("checksum"), "{error}");
        let other_version = test_device::changed_copy(&bdev, |image| {
            let mut superblock = Superblock::decode(&image[..4096]).unwrap();
            superblock.version = 2;
            superblock.encode(&mut image[..4096]);
        })
        .await;
        let error = refuse(other_version).await;
        assert!(error.contains("format version 2"), "{error}");
        let error = ShardEngine::open(Rc::clone(&bdev), 1, EngineOptions::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("shard 1 does not exist"), "{error}");
    });
}

#[test]
fn chunks_are_written_read_deleted_and_described() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let chunk = ChunkId(42);
        assert!(matches!(
            engine.read_chunk(chunk, 0, PAGE).await,
            Err(StorageError::ChunkNotFound(_))
        ));
        engine
            .write_chunk(chunk, PAGE, buffer(&engine, 2 * PAGE, 7), 3, LogIndex(0))
            .await
            .unwrap();
        let read = engine.read_chunk(chunk, 0, 4 * PAGE).await.unwrap();
        assert!(read.as_slice()[..PAGE as usize].iter().all(|b| *b == 0));
        assert!(read.as_slice()[PAGE as usize..3 * PAGE as usize]
            .iter()
            .all(|b| *b == 7));
        let info = engine.chunk_info(chunk).unwrap();
        assert_eq!((info.size, info.sn, info.snapshot_sn), (CHUNK, 3, None));
        let error = engine
            .write_chunk(chunk, 0, buffer(&engine, PAGE, 1), 2, LogIndex(0))
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::BackwardRequest { .. }),
            "{error}"
        );

        // Bad requests change nothing.
        for (offset, len) in [
            (100, PAGE),
            (0, 100),
            (CHUNK - PAGE, 2 * PAGE),
            (CHUNK, PAGE),
        ] {
            let data = engine.bdev().alloc(len as usize).unwrap();
            let error = engine
                .write_chunk(ChunkId(9), offset, data, 1, LogIndex(0))
                .await;
            assert!(
                matches!(
                    error,
                    Err(StorageError::Unaligned { .. } | StorageError::OutOfRange { .. })
                ),
                "{offset} {len}: {error:?}"
            );
        }
        assert!(engine.chunk_info(ChunkId(9)).is_err());

        engine.delete_chunk(chunk, LogIndex(0)).await.unwrap();
        engine.delete_chunk(chunk, LogIndex(0)).await.unwrap();
        assert!(engine.chunk_info(chunk).is_err());
        // The slot comes back zeroed for the next chunk.
        engine
            .write_chunk(ChunkId(43), 0, buffer(&engine, PAGE, 1), 1, LogIndex(0))
            .await
            .unwrap();
        let read = engine.read_chunk(ChunkId(43), 0, 4 * PAGE).await.unwrap();
        assert!(read.as_slice()[PAGE as usize..].iter().all(|b| *b == 0));
    });
}

fn entry(index: u64, data: Bytes) -> Entry {
    Entry {
        term: Term(1),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data,
    }
}

#[test]
fn a_checkpoint_and_the_wal_bring_everything_back_after_a_restart() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let copyset = CopysetId(5);
        for index in 1..=6u64 {
            let payload = Bytes::from(vec![index as u8; PAGE as usize]);
            let wal = engine.wal();
            wal.append_entries(copyset, &[entry(index, payload.clone())])
                .unwrap();
            let hs = HardState {
                term: Term(1),
                vote: Some(NodeId(1)),
                commit: LogIndex(index),
            };
            let lsn = wal.set_hard_state(copyset, hs).unwrap();
            wal.sync(lsn).await.unwrap();
            if index <= 4 {
                engine
                    .write_chunk_bytes(copyset, ChunkId(index), 0, payload, 1, LogIndex(0))
                    .await
                    .unwrap();
                engine.set_applied(copyset, LogIndex(index));
            }
            if index == 3 {
                engine.checkpoint().await.unwrap();
            }
        }
        drop(engine);
        let (engine, recovery) = open(&bdev).await;
        // Format wrote generation 1, opening 2, the checkpoint 3.
        assert_eq!(recovery.generation, 3);
        // Chunks 1..3 were checkpointed; chunk 4 was written after, and its metadata is
        // not on the device: recovery hands entries 4..6 back to apply again.
        assert_eq!(recovery.chunks, 3);
        let recovered = &recovery.copysets[0];
        assert_eq!(recovered.copyset, copyset);
        assert_eq!(recovered.applied, LogIndex(3));
        assert_eq!(recovered.hard_state.commit, LogIndex(6));
        assert_eq!(recovered.hard_state.vote, Some(NodeId(1)));
        let indices: Vec<u64> = recovered.to_apply.iter().map(|e| e.index.0).collect();
        assert_eq!(indices, vec![4, 5, 6]);
        let storage = engine.log_storage(copyset);
        assert_eq!(storage.first_index(), Ok(LogIndex(4)));
        assert_eq!(storage.last_index(), Ok(LogIndex(6)));
        assert_eq!(storage.term(LogIndex(3)), Ok(Term(1)));
        for entry in &recovered.to_apply {
            engine
                .write_chunk_bytes(
                    copyset,
                    ChunkId(entry.index.0),
                    0,
                    entry.data.clone(),
                    1,
                    LogIndex(0),
                )
                .await
                .unwrap();
            engine.set_applied(copyset, entry.index);
        }
        for index in 1..=6u64 {
            let read = engine.read_chunk(ChunkId(index), 0, PAGE).await.unwrap();
            assert!(read.as_slice().iter().all(|b| *b == index as u8));
        }
    });
}

#[test]
fn corrupt_metadata_is_detected_and_reported() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 9), 1, LogIndex(0))
            .await
            .unwrap();
        engine.checkpoint().await.unwrap();
        engine
            .write_chunk(ChunkId(2), 0, buffer(&engine, PAGE, 9), 1, LogIndex(0))
            .await
            .unwrap();
        engine.checkpoint().await.unwrap();
        let layout = *engine.layout();
        drop(engine);
        // One damaged copy: the other (older) one is believed.
        let one = test_device::changed_copy(&bdev, |image| {
            image[(layout.meta_page(0, 0) + 100) as usize] ^= 1
        })
        .await;
        let (engine, recovery) = open(&one).await;
        assert_eq!(recovery.chunks, 1, "the older copy knows chunk 1 only");
        drop(engine);
        // Both copies damaged: the shard refuses to open and says where.
        let both = test_device::changed_copy(&bdev, |image| {
            image[(layout.meta_page(0, 0) + 100) as usize] ^= 1;
            image[(layout.meta_page(0, 1) + 100) as usize] ^= 1;
        })
        .await;
        let error = ShardEngine::open(both, 0, EngineOptions::default())
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                error,
                StorageError::CorruptMetadata {
                    what: "chunk metadata page",
                    ..
                }
            ),
            "{error}"
        );
        let anchor = test_device::changed_copy(&bdev, |image| {
            image[(layout.anchor_page(0) + 40) as usize] ^= 1;
            image[(layout.anchor_page(1) + 40) as usize] ^= 1;
        })
        .await;
        let error = ShardEngine::open(anchor, 0, EngineOptions::default())
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(error.to_string().contains("WAL anchor"), "{error}");
    });
}

#[test]
fn chunk_operations_agree_with_a_model_across_checkpoints_and_restarts() {
    for seed in 0..8u64 {
        block_on(async {
            let mut rng = SmallRng::seed_from_u64(seed);
            let bdev = formatted(16 << 20).await;
            let (mut engine, _) = open(&bdev).await;
            let pages = CHUNK / PAGE;
            let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
            for step in 0..300 {
                let chunk = rng.gen_range(0..40u64);
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let first = rng.gen_range(0..pages);
                        let count = rng.gen_range(1..=(pages - first).min(4));
                        let fill = rng.gen_range(1..=255u8);
                        let result = engine
                            .write_chunk(
                                ChunkId(chunk),
                                first * PAGE,
                                buffer(&engine, count * PAGE, fill),
                                1,
                                LogIndex(0),
                            )
                            .await;
                        match result {
                            Ok(()) => {
                                let pages = model
                                    .entry(chunk)
                                    .or_insert_with(|| vec![0; pages as usize]);
                                for page in first..first + count {
                                    pages[page as usize] = fill;
                                }
                            }
                            Err(StorageError::Table(_)) => {
                                assert!(!model.contains_key(&chunk));
                            }
                            Err(e) => panic!("seed {seed} step {step}: {e}"),
                        }
                    }
                    6 => {
                        engine
                            .delete_chunk(ChunkId(chunk), LogIndex(0))
                            .await
                            .unwrap();
                        model.remove(&chunk);
                    }
                    7 => engine.checkpoint().await.unwrap(),
                    8 => {
                        // A clean restart after a checkpoint loses nothing.
                        engine.checkpoint().await.unwrap();
                        drop(engine);
                        engine = open(&bdev).await.0;
                    }
                    _ => {
                        let read = engine.read_chunk(ChunkId(chunk), 0, CHUNK).await;
                        match (read, model.get(&chunk)) {
                            (Ok(data), Some(pages)) => {
                                for (page, fill) in pages.iter().enumerate() {
                                    let bytes = &data.as_slice()
                                        [page * PAGE as usize..(page + 1) * PAGE as usize];
                                    assert!(
                                        bytes.iter().all(|b| b == fill),
                                        "seed {seed} step {step}: chunk {chunk} page {page}"
                                    );
                                }
                            }
                            (Err(StorageError::ChunkNotFound(_)), None) => {}
                            (other, expected) => panic!(
                                "seed {seed} step {step}: {:?} vs {}",
                                other.map(|_| ()),
                                expected.is_some()
                            ),
                        }
                    }
                }
            }
            let mut ids: Vec<u64> = model.keys().copied().collect();
            ids.sort();
            let found: Vec<u64> = engine.chunk_ids().iter().map(|c| c.0).collect();
            assert_eq!(found, ids, "seed {seed}");
        });
    }
}

#[test]
fn a_snapshot_image_is_served_in_pieces_and_survives_restarts() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let copyset = CopysetId(3);
        let wal = engine.wal();
        for index in 1..=4 {
            wal.append_entries(copyset, &[entry(index, Bytes::from_static(b"x"))])
                .unwrap();
        }
        let image = Bytes::from(vec![0xab; 1000]);
        let lsn = wal
            .create_snapshot(copyset, LogIndex(3), ConfState::default(), image.clone())
            .unwrap();
        wal.sync(lsn).await.unwrap();
        let storage = engine.log_storage(copyset);
        assert_eq!(storage.first_index(), Ok(LogIndex(4)));
        let piece = storage.snapshot_piece(LogIndex(3), 990, 100).unwrap();
        assert_eq!((piece.data.len(), piece.total_len), (10, 1000));
        assert_eq!(
            storage.snapshot_piece(LogIndex(2), 0, 10),
            Err(RaftStorageError::Unavailable)
        );
        drop(engine);
        // From the WAL record.
        let (engine, _) = open(&bdev).await;
        let piece = engine
            .log_storage(copyset)
            .snapshot_piece(LogIndex(3), 0, 4096)
            .unwrap();
        assert_eq!(piece.data, image);
        // From the copyset page, after a checkpoint reclaimed the WAL.
        engine.checkpoint().await.unwrap();
        drop(engine);
        let (engine, _) = open(&bdev).await;
        let storage = engine.log_storage(copyset);
        assert_eq!(storage.snapshot_meta().unwrap().index, LogIndex(3));
        assert_eq!(
            storage.snapshot_piece(LogIndex(3), 0, 4096).unwrap().data,
            image
        );
        assert_eq!(storage.last_index(), Ok(LogIndex(4)));
    });
}

#[derive(Debug, Clone, PartialEq)]
struct ModelChunk {
    pages: Vec<u8>,
    sn: u64,
    corrected: u64,
    snapshot: Option<(u64, Vec<u8>)>,
}

fn pages_of(data: &DmaBuf) -> Vec<u8> {
    data.as_slice()
        .chunks(PAGE as usize)
        .map(|page| {
            assert!(page.iter().all(|b| *b == page[0]), "a page of mixed bytes");
            page[0]
        })
        .collect()
}

#[test]
fn snapshots_by_sequence_number_agree_with_a_model() {
    let pages = (CHUNK / PAGE) as usize;
    for seed in 0..12u64 {
        block_on(async {
            let mut rng = SmallRng::seed_from_u64(seed);
            let bdev = formatted(16 << 20).await;
            let (mut engine, _) = open(&bdev).await;
            let mut model: HashMap<u64, ModelChunk> = HashMap::new();
            for step in 0..250 {
                let id = rng.gen_range(0..6u64);
                let chunk = ChunkId(id);
                let context = format!("seed {seed} step {step} chunk {id}");
                match rng.gen_range(0..12) {
                    0..=4 => {
                        let first = rng.gen_range(0..pages);
                        let count = rng.gen_range(1..=(pages - first).min(3));
                        let fill = rng.gen_range(1..=255u8);
                        let current = model.get(&id).map_or(1, |m| m.sn);
                        let sn = (current + rng.gen_range(0..3)).saturating_sub(1).max(1);
                        let data = buffer(&engine, (count as u64) * PAGE, fill);
                        let result = engine
                            .write_chunk(chunk, first as u64 * PAGE, data, sn, LogIndex(0))
                            .await;
                        let entry = model.get_mut(&id);
                        match entry {
                            None => {
                                result.unwrap_or_else(|e| panic!("{context}: {e}"));
                                let mut m = ModelChunk {
                                    pages: vec![0; pages],
                                    sn,
                                    corrected: 0,
                                    snapshot: None,
                                };
                                m.pages[first..first + count].fill(fill);
                                model.insert(id, m);
                            }
                            Some(m) if sn < m.sn => {
                                assert!(
                                    matches!(result, Err(StorageError::BackwardRequest { .. })),
                                    "{context}: {result:?}"
                                );
                            }
                            Some(m) if sn > m.sn && sn > m.corrected && m.snapshot.is_some() => {
                                assert!(
                                    matches!(result, Err(StorageError::Conflict { .. })),
                                    "{context}: {result:?}"
                                );
                            }
                            Some(m) => {
                                result.unwrap_or_else(|e| panic!("{context}: {e}"));
                                if sn > m.sn && sn > m.corrected {
                                    m.snapshot = Some((m.sn, m.pages.clone()));
                                }
                                m.sn = m.sn.max(sn);
                                m.pages[first..first + count].fill(fill);
                            }
                        }
                    }
                    5 => {
                        let corrected = model.get(&id).map_or(1, |m| m.sn) + rng.gen_range(0..2);
                        engine
                            .delete_snapshot_or_correct_sn(chunk, corrected, LogIndex(0))
                            .await
                            .unwrap();
                        if let Some(m) = model.get_mut(&id) {
                            m.snapshot = None;
                            if corrected > m.sn {
                                m.corrected = m.corrected.max(corrected);
                            }
                        }
                    }
                    6 => {
                        engine.delete_chunk(chunk, LogIndex(0)).await.unwrap();
                        model.remove(&id);
                    }
                    7 => {
                        engine.checkpoint().await.unwrap();
                        drop(engine);
                        engine = open(&bdev).await.0;
                    }
                    8 | 9 => {
                        let Some(m) = model.get(&id) else {
                            assert!(engine.chunk_info(chunk).is_err(), "{context}");
                            continue;
                        };
                        let read = engine.read_chunk(chunk, 0, CHUNK).await.unwrap();
                        assert_eq!(pages_of(&read), m.pages, "{context}");
                        let info = engine.chunk_info(chunk).unwrap();
                        assert_eq!(info.sn, m.sn, "{context}");
                        assert_eq!(
                            info.snapshot_sn,
                            m.snapshot.as_ref().map(|s| s.0),
                            "{context}"
                        );
                    }
                    _ => {
                        let Some(m) = model.get(&id) else { continue };
                        let Some((snapshot_sn, snapshot_pages)) = &m.snapshot else {
                            let missing = engine.read_snapshot(chunk, m.sn + 7, 0, PAGE).await;
                            assert!(
                                matches!(missing, Err(StorageError::SnapshotNotFound { .. })),
                                "{context}"
                            );
                            continue;
                        };
                        let read = engine
                            .read_snapshot(chunk, *snapshot_sn, 0, CHUNK)
                            .await
                            .unwrap();
                        assert_eq!(&pages_of(&read), snapshot_pages, "{context}");
                    }
                }
            }
        });
    }
}

#[test]
fn only_an_unclean_stop_leaves_slots_to_zero_before_reuse() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, recovery) = open(&bdev).await;
        assert_eq!(recovery.possibly_dirty_slots, 0, "a fresh device is clean");
        engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 5), 1, LogIndex(0))
            .await
            .unwrap();
        engine.close().await.unwrap();
        let (engine, recovery) = open(&bdev).await;
        assert_eq!(recovery.possibly_dirty_slots, 0, "a clean close adds none");
        drop(engine); // no close: as if the power went
        let (engine, recovery) = open(&bdev).await;
        let free = engine.layout().slots as usize - 1;
        assert_eq!(
            recovery.possibly_dirty_slots,
            free.min(RECOVERY_ZERO_SLOTS as usize)
        );
        // Such a slot reads as zeroes once a chunk takes it.
        test_device::modify(&bdev, |image| {
            let slot = engine.layout().slot_offset(1) as usize;
            image[slot..slot + PAGE as usize].fill(0xee);
        })
        .await;
        engine
            .write_chunk(ChunkId(2), PAGE, buffer(&engine, PAGE, 6), 1, LogIndex(0))
            .await
            .unwrap();
        let read = engine.read_chunk(ChunkId(2), 0, PAGE).await.unwrap();
        assert!(read.as_slice().iter().all(|b| *b == 0));
    });
}

#[test]
fn lazy_clones_read_through_until_written_and_flatten_agrees_with_a_model() {
    let pages = (CHUNK / PAGE) as usize;
    for seed in 0..10u64 {
        block_on(async {
            let mut rng = SmallRng::seed_from_u64(seed);
            let bdev = formatted(16 << 20).await;
            let (mut engine, _) = open(&bdev).await;
            // Sources 0 and 1, written once; clones 10..14 of them.
            let mut sources = HashMap::new();
            for source in 0..2u64 {
                let fill = 100 + source as u8;
                engine
                    .write_chunk(
                        ChunkId(source),
                        0,
                        buffer(&engine, CHUNK, fill),
                        1,
                        LogIndex(0),
                    )
                    .await
                    .unwrap();
                sources.insert(source, vec![fill; pages]);
            }
            // Per clone: its source, and its own pages (None: reads through).
            let mut clones: HashMap<u64, (u64, Vec<Option<u8>>)> = HashMap::new();
            for step in 0..200 {
                let id = 10 + rng.gen_range(0..4u64);
                let context = format!("seed {seed} step {step} clone {id}");
                match rng.gen_range(0..10) {
                    0 | 1 => {
                        let source = rng.gen_range(0..2u64);
                        let result = engine
                            .create_clone_chunk(ChunkId(id), ChunkId(source), 1, LogIndex(0))
                            .await;
                        match clones.get(&id) {
                            None => {
                                result.unwrap_or_else(|e| panic!("{context}: {e}"));
                                clones.insert(id, (source, vec![None; pages]));
                            }
                            Some((existing, own)) => {
                                let still_a_clone = own.iter().any(|p| p.is_none())
                                    || engine
                                        .chunk_info(ChunkId(id))
                                        .unwrap()
                                        .clone_source
                                        .is_some();
                                if *existing == source && still_a_clone {
                                    result.unwrap_or_else(|e| panic!("{context}: {e}"));
                                } else {
                                    assert!(
                                        matches!(result, Err(StorageError::Conflict { .. })),
                                        "{context}: {result:?}"
                                    );
                                }
                            }
                        }
                    }
                    2 | 3 => {
                        let Some((_, own)) = clones.get_mut(&id) else {
                            continue;
                        };
                        let first = rng.gen_range(0..pages);
                        let count = rng.gen_range(1..=(pages - first).min(3));
                        let fill = rng.gen_range(1..=99u8);
                        let paste = rng.gen_bool(0.3);
                        let data = buffer(&engine, count as u64 * PAGE, fill);
                        if paste {
                            engine
                                .paste_chunk(ChunkId(id), first as u64 * PAGE, data, LogIndex(0))
                                .await
                                .unwrap();
                            for page in &mut own[first..first + count] {
                                page.get_or_insert(fill);
                            }
                        } else {
                            engine
                                .write_chunk(ChunkId(id), first as u64 * PAGE, data, 1, LogIndex(0))
                                .await
                                .unwrap();
                            for page in &mut own[first..first + count] {
                                *page = Some(fill);
                            }
                        }
                    }
                    4 => {
                        let Some((source, own)) = clones.get_mut(&id) else {
                            continue;
                        };
                        let first = rng.gen_range(0..pages);
                        engine
                            .recover_chunk(ChunkId(id), first as u64 * PAGE, PAGE, LogIndex(0))
                            .await
                            .unwrap();
                        own[first].get_or_insert(sources[source][first]);
                    }
                    5 => {
                        let Some((source, own)) = clones.get_mut(&id) else {
                            continue;
                        };
                        engine
                            .flatten_chunk(ChunkId(id), LogIndex(0))
                            .await
                            .unwrap();
                        for (page, value) in own.iter_mut().enumerate() {
                            value.get_or_insert(sources[source][page]);
                        }
                        assert_eq!(engine.chunk_info(ChunkId(id)).unwrap().clone_source, None);
                    }
                    6 => {
                        engine.delete_chunk(ChunkId(id), LogIndex(0)).await.unwrap();
                        clones.remove(&id);
                    }
                    7 => {
                        engine.checkpoint().await.unwrap();
                        drop(engine);
                        engine = open(&bdev).await.0;
                    }
                    _ => {
                        let Some((source, own)) = clones.get(&id) else {
                            continue;
                        };
                        let read = engine.read_chunk(ChunkId(id), 0, CHUNK).await.unwrap();
                        let expected: Vec<u8> = own
                            .iter()
                            .enumerate()
                            .map(|(page, value)| value.unwrap_or(sources[source][page]))
                            .collect();
                        assert_eq!(pages_of(&read), expected, "{context}");
                    }
                }
            }
        });
    }
}

#[test]
fn a_clone_refuses_a_snapshot_and_a_clone_of_a_clone() {
    block_on(async {
        let bdev = formatted(16 << 20).await;
        let (engine, _) = open(&bdev).await;
        engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 1), 1, LogIndex(0))
            .await
            .unwrap();
        engine
            .create_clone_chunk(ChunkId(2), ChunkId(1), 1, LogIndex(0))
            .await
            .unwrap();
        let error = engine
            .write_chunk(ChunkId(2), 0, buffer(&engine, PAGE, 2), 2, LogIndex(0))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("flatten"), "{error}");
        let error = engine
            .create_clone_chunk(ChunkId(3), ChunkId(2), 1, LogIndex(0))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("itself a lazy clone"), "{error}");
        let error = engine
            .create_clone_chunk(ChunkId(4), ChunkId(9), 1, LogIndex(0))
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::ChunkNotFound(ChunkId(9))),
            "{error}"
        );
    });
}

/// An operation of the image test's copyset log.
#[derive(Debug, Clone, Copy)]
enum ImageOp {
    Write {
        chunk: u64,
        page: u64,
        pages: u64,
        fill: u8,
        sn: u64,
    },
    Delete {
        chunk: u64,
    },
    DeleteSnapshotOrCorrectSn {
        chunk: u64,
        sn: u64,
    },
    CreateClone {
        chunk: u64,
        source: u64,
    },
    Paste {
        chunk: u64,
        page: u64,
        fill: u8,
    },
    Recover {
        chunk: u64,
        page: u64,
    },
    Flatten {
        chunk: u64,
    },
}

fn random_image_op(rng: &mut SmallRng) -> ImageOp {
    // Chunks 1-5 are written, 6-7 are made clones of them.
    let chunk = rng.gen_range(1..=7);
    match rng.gen_range(0..26) {
        0 => ImageOp::Delete { chunk },
        1 => ImageOp::DeleteSnapshotOrCorrectSn {
            chunk,
            sn: rng.gen_range(1..=4),
        },
        2 | 3 => ImageOp::CreateClone {
            chunk: rng.gen_range(6..=7),
            source: rng.gen_range(1..=5),
        },
        4 => ImageOp::Paste {
            chunk,
            page: rng.gen_range(0..CHUNK / PAGE),
            fill: rng.gen(),
        },
        5 => ImageOp::Recover {
            chunk,
            page: rng.gen_range(0..CHUNK / PAGE),
        },
        6 => ImageOp::Flatten { chunk },
        _ => {
            let page = rng.gen_range(0..CHUNK / PAGE);
            ImageOp::Write {
                chunk,
                page,
                pages: rng.gen_range(1..=(CHUNK / PAGE - page).min(4)),
                fill: rng.gen(),
                // Mostly the current sn; now and then a newer one (a snapshot).
                sn: if rng.gen_range(0..8) == 0 { 2 } else { 1 },
            }
        }
    }
}

/// Applies `op` as the entry at `index` of `copyset`; refusals (an older sn, a second
/// snapshot) change nothing, as on every replica.
async fn apply_image_op(
    engine: &ShardEngine<AnyBdev>,
    copyset: CopysetId,
    index: u64,
    op: ImageOp,
) {
    let index = LogIndex(index);
    let chunk = ChunkId(match op {
        ImageOp::Write { chunk, .. }
        | ImageOp::Delete { chunk }
        | ImageOp::DeleteSnapshotOrCorrectSn { chunk, .. }
        | ImageOp::CreateClone { chunk, .. }
        | ImageOp::Paste { chunk, .. }
        | ImageOp::Recover { chunk, .. }
        | ImageOp::Flatten { chunk } => chunk,
    });
    let result = match op {
        ImageOp::Write {
            chunk,
            page,
            pages,
            fill,
            sn,
        } => {
            let data = buffer(engine, pages * PAGE, fill);
            engine
                .write_chunk_in(copyset, ChunkId(chunk), page * PAGE, data, sn, index)
                .await
        }
        ImageOp::Delete { chunk } => engine.delete_chunk(ChunkId(chunk), index).await,
        ImageOp::DeleteSnapshotOrCorrectSn { chunk, sn } => {
            engine
                .delete_snapshot_or_correct_sn(ChunkId(chunk), sn, index)
                .await
        }
        ImageOp::CreateClone { chunk, source } => {
            engine
                .create_clone_chunk_in(copyset, ChunkId(chunk), ChunkId(source), 1, index)
                .await
        }
        ImageOp::Paste { chunk, page, fill } => {
            let data = buffer(engine, PAGE, fill);
            engine
                .paste_chunk(ChunkId(chunk), page * PAGE, data, index)
                .await
        }
        ImageOp::Recover { chunk, page } => {
            engine
                .recover_chunk(ChunkId(chunk), page * PAGE, PAGE, index)
                .await
        }
        ImageOp::Flatten { chunk } => engine.flatten_chunk(ChunkId(chunk), index).await,
    };
    match result {
        Ok(()) => {}
        // Refusals every replica makes alike: applied, as the chunkserver records them.
        Err(
            StorageError::BackwardRequest { .. }
            | StorageError::Conflict { .. }
            | StorageError::ChunkNotFound(_)
            | StorageError::SnapshotNotFound { .. },
        ) => engine.note_applied(CopysetId(0), chunk, index),
        Err(error) => panic!("entry {index}: {op:?}: {error}"),
    }
}

/// The source keeps applying entries while a replica copies the copyset's image piece by
/// piece; the replica then applies the entries above the snapshot's index. Whatever the
/// interleaving, the replica ends equal to the source — data, snapshots, sequence numbers —
/// chunks the source deleted are gone, and a chunk of another copyset is untouched.
#[test]
fn a_copyset_image_copied_under_writes_plus_the_log_equals_the_source() {
    for seed in 0..64u64 {
        block_on(async {
            let copyset = CopysetId(3);
            let other = CopysetId(4);
            let (source, _) = open(&formatted(16 << 20).await).await;
            let (replica, _) = open(&formatted(16 << 20).await).await;
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut log = Vec::new();
            // The replica applied the first entries, then fell behind.
            let behind = rng.gen_range(0..20u64);
            for index in 1..=60u64 {
                let op = random_image_op(&mut rng);
                apply_image_op(&source, copyset, index, op).await;
                if index <= behind {
                    apply_image_op(&replica, copyset, index, op).await;
                }
                log.push((index, op));
            }
            replica
                .write_chunk_in(
                    other,
                    ChunkId(9),
                    0,
                    buffer(&replica, PAGE, 9),
                    1,
                    LogIndex(1),
                )
                .await
                .unwrap();
            let snapshot_index = 60u64;
            let mut next = snapshot_index + 1;

            // The copy, with the source applying more entries between pieces; a change of
            // clone relationships during it makes it start over, as the chunkserver does.
            let mut copied = BTreeSet::new();
            let mut attempts = 0;
            'attempt: loop {
                attempts += 1;
                assert!(attempts < 50, "seed {seed}: the copy never settles");
                let epoch = source.clone_epoch();
                let list = source.chunks_of(copyset);
                let keep: BTreeSet<ChunkId> = list.iter().copied().collect();
                replica
                    .prepare_image(copyset, &keep, &copied)
                    .await
                    .unwrap();
                for chunk in list {
                    if copied.contains(&chunk) {
                        continue;
                    }
                    let fetch = async |part, offset, len| {
                        if rng.gen_range(0..3) == 0 {
                            let op = random_image_op(&mut rng);
                            apply_image_op(&source, copyset, next, op).await;
                            log.push((next, op));
                            next += 1;
                        }
                        let piece = match source.read_image_piece(chunk, part, offset, len).await {
                            Ok(piece) => piece,
                            Err(StorageError::ChunkNotFound(_)) => return Ok(None),
                            Err(error) => return Err(error.to_string()),
                        };
                        if source.clone_epoch() != epoch {
                            return Err("start over".to_string());
                        }
                        let data = piece
                            .data
                            .map_or_else(Bytes::new, |d| Bytes::copy_from_slice(d.as_slice()));
                        Ok(Some((piece.meta, data)))
                    };
                    match replica
                        .copy_chunk_image(copyset, chunk, CHUNK, 4 * PAGE, 64, fetch)
                        .await
                    {
                        Ok(_) => {
                            copied.insert(chunk);
                        }
                        Err(reason) if reason == "start over" => {
                            copied.clear();
                            continue 'attempt;
                        }
                        Err(reason) => panic!("seed {seed}: {reason}"),
                    }
                }
                break;
            }
            // The log above the snapshot, applied again.
            for (index, op) in &log {
                if *index > snapshot_index {
                    apply_image_op(&replica, copyset, *index, *op).await;
                }
            }

            assert_eq!(
                replica.chunks_of(copyset),
                source.chunks_of(copyset),
                "seed {seed}"
            );
            assert_eq!(replica.chunks_of(other), vec![ChunkId(9)], "seed {seed}");
            for chunk in source.chunks_of(copyset) {
                let expected = source.chunk_info(chunk).unwrap();
                let got = replica.chunk_info(chunk).unwrap();
                assert_eq!(got.sn, expected.sn, "seed {seed} chunk {chunk}");
                assert_eq!(
                    got.snapshot_sn, expected.snapshot_sn,
                    "seed {seed} chunk {chunk}"
                );
                assert_eq!(
                    got.corrected_sn, expected.corrected_sn,
                    "seed {seed} chunk {chunk}"
                );
                assert_eq!(
                    got.clone_source, expected.clone_source,
                    "seed {seed} chunk {chunk}"
                );
                assert_eq!(
                    pages_of(&replica.read_chunk(chunk, 0, CHUNK).await.unwrap()),
                    pages_of(&source.read_chunk(chunk, 0, CHUNK).await.unwrap()),
                    "seed {seed} chunk {chunk}: data"
                );
                if let Some(sn) = expected.snapshot_sn {
                    assert_eq!(
                        pages_of(&replica.read_snapshot(chunk, sn, 0, CHUNK).await.unwrap()),
                        pages_of(&source.read_snapshot(chunk, sn, 0, CHUNK).await.unwrap()),
                        "seed {seed} chunk {chunk}: snapshot"
                    );
                }
            }
        });
    }
}

/// A deleted copyset stays deleted across restarts (its page gets a tombstone, its chunks go),
/// a new copyset can take its page, and chunks left by a deletion a crash interrupted are
/// removed at the next start.
#[test]
fn a_deleted_copyset_stays_deleted_and_its_page_is_reused() {
    block_on(async {
        let bdev = formatted(16 << 20).await;
        let create = |engine: &ShardEngine<AnyBdev>, copyset: CopysetId| {
            engine
                .wal()
                .install_snapshot(
                    copyset,
                    raftcore::Snapshot {
                        meta: SnapshotMeta {
                            index: LogIndex(1),
                            term: Term(1),
                            conf_state: ConfState::default(),
                        },
                        data: Bytes::new(),
                    },
                )
                .unwrap()
        };
        let (engine, _) = open(&bdev).await;
        for copyset in [CopysetId(1), CopysetId(2)] {
            let lsn = create(&engine, copyset);
            engine.wal().sync(lsn).await.unwrap();
            let chunk = ChunkId(copyset.0 * 10);
            let data = buffer(&engine, PAGE, copyset.0 as u8);
            engine
                .write_chunk_in(copyset, chunk, 0, data, 1, LogIndex(2))
                .await
                .unwrap();
        }
        engine.checkpoint().await.unwrap();
        engine.remove_copyset(CopysetId(1)).await.unwrap();
        assert!(engine.chunks_of(CopysetId(1)).is_empty());
        drop(engine);

        // Without a checkpoint, the WAL record removes it; after one, the tombstone does.
        for checkpoint in [false, true] {
            let (engine, recovery) = open(&bdev).await;
            let ids: Vec<u64> = recovery.copysets.iter().map(|c| c.copyset.0).collect();
            assert_eq!(ids, vec![2], "checkpoint {checkpoint}");
            // The chunk's deletion was not checkpointed before the first restart (a crash):
            // it comes back as an orphan, and goes.
            let orphans = engine.remove_orphan_chunks().await.unwrap();
            assert_eq!(orphans, usize::from(!checkpoint), "checkpoint {checkpoint}");
            assert_eq!(engine.chunk_ids(), vec![ChunkId(20)]);
            if checkpoint {
                engine.checkpoint().await.unwrap();
            }
            engine.checkpoint().await.unwrap();
        }

        // A new copyset takes the free page; a deletion cut short by a crash leaves orphans.
        let (engine, _) = open(&bdev).await;
        let lsn = create(&engine, CopysetId(3));
        engine.wal().sync(lsn).await.unwrap();
        let data = buffer(&engine, PAGE, 3);
        engine
            .write_chunk_in(CopysetId(3), ChunkId(30), 0, data, 1, LogIndex(2))
            .await
            .unwrap();
        engine.checkpoint().await.unwrap();
        let lsn = engine.wal().remove_copyset(CopysetId(2)).unwrap();
        engine.wal().sync(lsn).await.unwrap();
        engine.checkpoint().await.unwrap();
        drop(engine);
        let (engine, recovery) = open(&bdev).await;
        let ids: Vec<u64> = recovery.copysets.iter().map(|c| c.copyset.0).collect();
        assert_eq!(ids, vec![3]);
        assert_eq!(engine.chunk_ids(), vec![ChunkId(20), ChunkId(30)]);
        assert_eq!(engine.remove_orphan_chunks().await.unwrap(), 1);
        assert_eq!(engine.chunk_ids(), vec![ChunkId(30)]);
        let read = engine.read_chunk(ChunkId(30), 0, PAGE).await.unwrap();
        assert_eq!(pages_of(&read), vec![3]);
    });
}

/// A copyset whose entries cannot be applied (no quorum, or idle behind an uncommitted tail)
/// sits at the head of the ring while another copyset writes ten laps through it: checkpoints
/// move the stuck entries forward instead of letting them pin the head, every append finds
/// room after at most one checkpoint, control records never wait, and a restart brings the
/// stuck entries back.
#[test]
fn a_copyset_that_cannot_apply_does_not_pin_the_wal() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let wal = engine.wal().clone();
        let stuck = CopysetId(3);
        let busy = CopysetId(4);
        let payload = |index: u64| Bytes::from(vec![index as u8; 3000]);
        let mut lsn = 0;
        for index in 1..=4 {
            lsn = wal
                .append_entries(stuck, &[entry(index, payload(index))])
                .unwrap();
        }
        wal.sync(lsn).await.unwrap();
        let ring = wal.size();
        let mut written = 0u64;
        let mut index = 0u64;
        let mut checkpoints = 0;
        while written < 10 * ring {
            index += 1;
            let appended = wal.append_entries(busy, &[entry(index, payload(index))]);
            let lsn = match appended {
                Ok(lsn) => lsn,
                Err(StorageError::WalFull { .. }) => {
                    engine.checkpoint().await.unwrap();
                    checkpoints += 1;
                    wal.append_entries(busy, &[entry(index, payload(index))])
                        .unwrap_or_else(|e| panic!("entry {index} after a checkpoint: {e}"))
                }
                Err(error) => panic!("{error}"),
            };
            // A control record (the commit index) never needs a checkpoint first.
            let hs = HardState {
                term: Term(1),
                vote: Some(NodeId(1)),
                commit: LogIndex(index),
            };
            let lsn = wal.set_hard_state(busy, hs).map_or(lsn, |l| l.max(lsn));
            wal.sync(lsn).await.unwrap();
            engine.set_applied(busy, LogIndex(index));
            written += 3000;
            if engine.maybe_checkpoint().await.unwrap() {
                checkpoints += 1;
            }
        }
        assert!(checkpoints > 10, "{checkpoints} checkpoints");
        // The stuck copyset's entries are still there, wherever they now stand.
        let stuck_last = wal.with_log(stuck, |log| log.last()).unwrap();
        assert_eq!(stuck_last, LogIndex(4));
        drop(engine);
        let (engine, recovery) = open(&bdev).await;
        let log = |copyset| {
            engine
                .wal()
                .with_log(copyset, |log| (log.last(), log.applied))
                .unwrap()
        };
        assert_eq!(log(stuck), (LogIndex(4), LogIndex(0)));
        assert!(log(busy).0 >= LogIndex(index - 1), "{:?}", log(busy));
        let storage = engine.log_storage(stuck);
        let entries =
            raftcore::LogStorage::entries(&storage, LogIndex(1), LogIndex(5), u64::MAX).unwrap();
        assert_eq!(entries.len(), 4);
        for entry in &entries {
            assert_eq!(entry.data, payload(entry.index.0));
        }
        assert!(recovery.copysets.iter().any(|c| c.copyset == stuck));
    });
}

/// Issue 25, item 1: two copysets of one shard create the same chunk id at once, and the
/// allocation awaits in between (a checkpoint is due after 32 allocations). One creation wins;
/// the other is refused with a clear error, never an assertion (which would abort every shard
/// of the process); and the refusal does not stamp the winner's chunk with the loser's log
/// index.
#[test]
fn concurrent_creations_of_one_chunk_by_two_copysets_are_refused_not_fatal() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let (a, b) = (CopysetId(1), CopysetId(2));
        let page = |fill: u8| Bytes::from(vec![fill; PAGE as usize]);
        for i in 0..RECOVERY_ZERO_SLOTS as u64 {
            engine
                .write_chunk_bytes(a, ChunkId(1000 + i), 0, page(1), 1, LogIndex(i + 1))
                .await
                .unwrap();
        }
        let chunk = ChunkId(7);
        let (first, second) = futures_lite::future::zip(
            engine.write_chunk_bytes(a, chunk, 0, page(0xaa), 1, LogIndex(40)),
            engine.write_chunk_bytes(b, chunk, 0, page(0xbb), 1, LogIndex(9000)),
        )
        .await;
        let refused = match (&first, &second) {
            (Ok(()), Err(error)) | (Err(error), Ok(())) => error,
            other => panic!("exactly one creation wins: {other:?}"),
        };
        assert!(
            matches!(refused, StorageError::Conflict { .. }),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("created the chunk"),
            "{refused}"
        );
        let (winner, loser, loser_index) = if first.is_ok() {
            (a, b, LogIndex(9000))
        } else {
            (b, a, LogIndex(40))
        };
        let applied_before = engine.chunk_image_meta(chunk).unwrap();
        engine.note_applied(loser, chunk, loser_index);
        assert_eq!(engine.chunk_image_meta(chunk).unwrap(), applied_before);
        engine.check_owner(chunk, winner).unwrap();
        // A later write of the loser with a low index of its own log is refused too, not
        // taken for "already applied" against the winner's index and acknowledged unwritten.
        let again = engine
            .write_chunk_bytes(loser, chunk, 0, page(0xcc), 1, LogIndex(1))
            .await;
        assert!(
            matches!(again, Err(StorageError::Conflict { .. })),
            "{again:?}"
        );
        let data = engine.read_chunk(chunk, 0, PAGE).await.unwrap();
        let expected = if winner == a { 0xaa } else { 0xbb };
        assert!(data.as_slice().iter().all(|byte| *byte == expected));
    });
}

/// An install cut short leaves every chunk whole: the image of a chunk is staged under an id
/// of its own and takes the chunk's place only once complete. Here the copy of chunk 7 fails
/// half-way after a checkpoint made the staged half durable, and the shard crashes: after the
/// restart chunk 7 still holds its old bytes (re-applying the log above the old applied index
/// is all that will happen to it, and a deleted chunk would stay lost), and nothing staged is
/// left. A complete copy then replaces it.
#[test]
fn an_install_cut_short_by_a_crash_leaves_the_old_chunk_whole() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let copyset = CopysetId(3);
        let chunk = ChunkId(7);
        let old = Bytes::from(vec![0x11; CHUNK as usize]);
        // The copyset exists on the shard (a restart deletes chunks of copysets it has not).
        let lsn = engine
            .wal()
            .set_hard_state(copyset, HardState::default())
            .unwrap();
        engine.wal().sync(lsn).await.unwrap();
        engine
            .write_chunk_bytes(copyset, chunk, 0, old.clone(), 1, LogIndex(5))
            .await
            .unwrap();
        engine.checkpoint().await.unwrap();
        // The source applied a later entry to the chunk than this replica did.
        let mut image_meta = engine.chunk_image_meta(chunk).unwrap();
        image_meta.applied = 9;
        let new_piece =
            |offset: u64| Bytes::from(vec![0x22 ^ (offset / PAGE) as u8; PAGE as usize]);
        // The copy: two pieces of the new image arrive, a checkpoint runs, then the source
        // goes away.
        let copy = async |engine: &ShardEngine<AnyBdev>, fail_at: Option<u32>| {
            let mut pieces = 0;
            engine
                .copy_chunk_image(
                    copyset,
                    chunk,
                    CHUNK,
                    PAGE,
                    4,
                    async |_part, offset, len| {
                        if len == 0 {
                            return Ok(Some((image_meta, Bytes::new())));
                        }
                        pieces += 1;
                        if Some(pieces) == fail_at {
                            engine.checkpoint().await.map_err(|e| e.to_string())?;
                            return Err("the source went away".to_string());
                        }
                        Ok(Some((image_meta, new_piece(offset))))
                    },
                )
                .await
        };
        let result = copy(&engine, Some(3)).await;
        assert_eq!(result, Err("the source went away".to_string()));
        assert!(
            reads_as(&engine, chunk, &old).await,
            "the old chunk is whole while the copy is cut short"
        );
        assert_eq!(
            engine.chunks_of(copyset),
            vec![chunk],
            "the staged image is not listed"
        );
        // The crash: no clean close.
        drop(engine);
        let (engine, _) = open(&bdev).await;
        engine.remove_orphan_chunks().await.unwrap();
        assert!(
            reads_as(&engine, chunk, &old).await,
            "the old chunk is whole after the restart"
        );
        assert_eq!(engine.chunk_ids(), vec![chunk], "nothing staged is left");
        // A complete copy takes the chunk's place.
        copy(&engine, None).await.unwrap();
        let data = engine.read_chunk(chunk, 0, CHUNK).await.unwrap();
        for page in 0..CHUNK / PAGE {
            let at = (page * PAGE) as usize;
            assert_eq!(data.as_slice()[at], 0x22 ^ page as u8, "page {page}");
        }
        // The chunk it replaced stays (retired) until a checkpoint records the swap.
        assert_eq!(engine.chunk_ids().len(), 2);
        engine.checkpoint().await.unwrap();
        assert_eq!(engine.chunk_ids(), vec![chunk]);
        assert_eq!(
            engine.chunk_image_meta(chunk).unwrap().applied,
            image_meta.applied
        );
    });
}

/// Whether the whole of `chunk` reads as `expected`.
async fn reads_as(engine: &ShardEngine<AnyBdev>, chunk: ChunkId, expected: &[u8]) -> bool {
    let data = engine.read_chunk(chunk, 0, CHUNK).await.unwrap();
    data.as_slice() == expected
}

/// Installs of two copysets of one shard run at once: one preparing (which removes its own
/// staged images left by an attempt cut short) must not touch the other's image half-way
/// through its copy — that copy would write its later pieces into a new chunk and swap in one
/// whose earlier pages read as zeroes (the 30-minute realistic run of 2026-12-07 found it:
/// fio read back zeroes for acknowledged blocks).
#[test]
fn an_install_preparing_leaves_another_copysets_staged_image_alone() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let (a, b) = (CopysetId(3), CopysetId(4));
        let chunk = ChunkId(7);
        engine
            .write_chunk_bytes(
                a,
                chunk,
                0,
                Bytes::from(vec![0x11; CHUNK as usize]),
                1,
                LogIndex(5),
            )
            .await
            .unwrap();
        // The source applied a later entry to the chunk than this replica did.
        let mut image_meta = engine.chunk_image_meta(chunk).unwrap();
        image_meta.applied = 9;
        let new_piece =
            |offset: u64| Bytes::from(vec![0x40 ^ (offset / PAGE) as u8; PAGE as usize]);
        let mut pieces = 0;
        engine
            .copy_chunk_image(a, chunk, CHUNK, PAGE, 4, async |_part, offset, len| {
                if len == 0 {
                    return Ok(Some((image_meta, Bytes::new())));
                }
                pieces += 1;
                if pieces == 3 {
                    // Copyset b's install begins meanwhile.
                    engine
                        .prepare_image(b, &BTreeSet::new(), &BTreeSet::new())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(Some((image_meta, new_piece(offset))))
            })
            .await
            .unwrap();
        let data = engine.read_chunk(chunk, 0, CHUNK).await.unwrap();
        for page in 0..CHUNK / PAGE {
            let at = (page * PAGE) as usize;
            assert_eq!(data.as_slice()[at], 0x40 ^ page as u8, "page {page}");
        }
        engine.checkpoint().await.unwrap();
        assert_eq!(engine.chunk_ids(), vec![chunk], "nothing staged is left");
    });
}

/// An install swaps in one chunk after another; a crash before a checkpoint recorded those
/// swaps brings back the table of the last checkpoint, which maps each swapped chunk to the
/// slot it had then. Those slots must still hold the chunks' old bytes: the slot a swap
/// retires is neither zeroed nor handed out again until a checkpoint recorded the swap.
/// (The 30-minute realistic run of 2026-12-07 found it: after a power cut in an install the
/// retired slot of chunk k held the staged image of chunk k+1, and chunks 2..7 of the
/// write-once area read back their successors' pages.)
#[test]
fn a_crash_after_an_install_swapped_chunks_in_leaves_each_chunk_its_own_bytes() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let copyset = CopysetId(3);
        let lsn = engine
            .wal()
            .set_hard_state(copyset, HardState::default())
            .unwrap();
        engine.wal().sync(lsn).await.unwrap();
        // More chunks than may wait retired: the install runs a checkpoint half-way.
        let chunks: Vec<ChunkId> = (2..9).map(ChunkId).collect();
        let old = |chunk: ChunkId| vec![0x10 + chunk.0 as u8; CHUNK as usize];
        let new = |chunk: ChunkId| vec![0x80 + chunk.0 as u8; CHUNK as usize];
        for &chunk in &chunks {
            engine
                .write_chunk_bytes(copyset, chunk, 0, Bytes::from(old(chunk)), 1, LogIndex(5))
                .await
                .unwrap();
        }
        engine.checkpoint().await.unwrap();
        let mut image_meta = engine.chunk_image_meta(chunks[0]).unwrap();
        image_meta.applied = 9;
        for &chunk in &chunks {
            engine
                .copy_chunk_image(
                    copyset,
                    chunk,
                    CHUNK,
                    4 * PAGE,
                    4,
                    async |_part, offset, len| {
                        if len == 0 {
                            return Ok(Some((image_meta, Bytes::new())));
                        }
                        let at = offset as usize;
                        Ok(Some((
                            image_meta,
                            Bytes::from(new(chunk)[at..at + len as usize].to_vec()),
                        )))
                    },
                )
                .await
                .unwrap();
            assert!(reads_as(&engine, chunk, &new(chunk)).await);
        }
        // The crash: no clean close, no checkpoint since the swaps (unless the install ran
        // one itself).
        drop(engine);
        let (engine, _) = open(&bdev).await;
        engine.remove_orphan_chunks().await.unwrap();
        let mut swapped = 0;
        for &chunk in &chunks {
            let data = engine.read_chunk(chunk, 0, CHUNK).await.unwrap();
            swapped += usize::from(data.as_slice() == new(chunk).as_slice());
            assert!(
                data.as_slice() == old(chunk).as_slice()
                    || data.as_slice() == new(chunk).as_slice(),
                "chunk {chunk} holds neither its old nor its new bytes after the crash \
                 (first byte {:#x})",
                data.as_slice()[0]
            );
        }
        assert!(
            swapped > 0 && swapped < chunks.len(),
            "the checkpoint half-way recorded some swaps, not all ({swapped})"
        );
        assert_eq!(engine.chunk_ids(), chunks, "nothing staged is left");
    });
}

/// An install copies only the chunks that differ: a chunk whose last applied entry and
/// versions are the source's is kept as it is (no byte travels), one the source changed
/// since is copied.
#[test]
fn an_install_skips_a_chunk_whose_last_applied_entry_is_the_sources() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let copyset = CopysetId(3);
        let chunk = ChunkId(7);
        let old = Bytes::from(vec![0x11; CHUNK as usize]);
        engine
            .write_chunk_bytes(copyset, chunk, 0, old.clone(), 1, LogIndex(5))
            .await
            .unwrap();
        let same = engine.chunk_image_meta(chunk).unwrap();
        let copy = async |meta: ChunkImageMeta| {
            let mut pieces = 0u32;
            let bytes = engine
                .copy_chunk_image(
                    copyset,
                    chunk,
                    CHUNK,
                    PAGE,
                    4,
                    async |_part, _offset, len| {
                        if len == 0 {
                            return Ok(Some((meta, Bytes::new())));
                        }
                        pieces += 1;
                        Ok(Some((meta, Bytes::from(vec![0x22; len as usize]))))
                    },
                )
                .await
                .unwrap();
            (bytes, pieces)
        };
        assert_eq!(
            copy(same).await,
            (0, 0),
            "nothing travels for an equal chunk"
        );
        assert!(reads_as(&engine, chunk, &old).await);
        let mut newer = same;
        newer.applied = 6;
        assert_eq!(copy(newer).await, (CHUNK, (CHUNK / PAGE) as u32));
        assert!(reads_as(&engine, chunk, &vec![0x22; CHUNK as usize]).await);
    });
}

/// Checkpoints that keep recent history (`WalBudget::retention`) and move live entries
/// forward, over many laps of the ring with copysets that stall for a while, then restarts:
/// every restart replays a log that follows from each copyset's checkpoint — no record is
/// skipped — and brings back every entry above the applied index.
#[test]
fn restarts_after_checkpoints_that_keep_history_replay_every_log_whole() {
    for seed in 0..6u64 {
        block_on(async {
            let bdev = formatted(8 << 20).await;
            let mut rng = SmallRng::seed_from_u64(seed);
            let copysets = [CopysetId(3), CopysetId(4), CopysetId(5)];
            let mut last = [0u64; 3];
            let mut applied = [0u64; 3];
            for round in 0..6 {
                let (engine, recovery) = open(&bdev).await;
                assert_eq!(recovery.wal_skipped, 0, "seed {seed} round {round}");
                for (i, copyset) in copysets.iter().enumerate() {
                    let (log_last, log_applied) = engine
                        .wal()
                        .with_log(*copyset, |log| (log.last().0, log.applied.0))
                        .unwrap_or((0, 0));
                    assert!(
                        log_last >= last[i] && log_applied <= applied[i],
                        "seed {seed} round {round} copyset {copyset}: last {log_last} of \
                         {}, applied {log_applied} of {}",
                        last[i],
                        applied[i]
                    );
                    // What the checkpoint made durable counts as applied from here on.
                    applied[i] = log_applied;
                    last[i] = log_last;
                }
                let wal = engine.wal().clone();
                for _ in 0..400 {
                    let i = rng.gen_range(0..copysets.len());
                    let len = rng.gen_range(100..6000usize);
                    let index = last[i] + 1;
                    let appended = wal.append_entries(
                        copysets[i],
                        &[entry(index, Bytes::from(vec![index as u8; len]))],
                    );
                    let lsn = match appended {
                        Ok(lsn) => lsn,
                        Err(StorageError::WalFull { .. }) => {
                            // Apply everything, then a checkpoint makes room.
                            for (j, copyset) in copysets.iter().enumerate() {
                                applied[j] = last[j];
                                engine.set_applied(*copyset, LogIndex(last[j]));
                            }
                            engine.checkpoint().await.unwrap();
                            continue;
                        }
                        Err(error) => panic!("{error}"),
                    };
                    wal.sync(lsn).await.unwrap();
                    last[i] = index;
                    // Copysets apply at their own pace; copyset 5 stalls for long stretches.
                    if rng.gen_range(0..4) == 0 && !(i == 2 && rng.gen_range(0..5) != 0) {
                        applied[i] = rng.gen_range(applied[i]..=last[i]);
                        engine.set_applied(copysets[i], LogIndex(applied[i]));
                    }
                    engine.maybe_checkpoint().await.unwrap();
                    if rng.gen_range(0..40) == 0 {
                        engine.checkpoint().await.unwrap();
                    }
                }
                drop(engine); // a crash: no clean close
            }
        });
    }
}

/// A suffix that a new leader's entries replaced must not come back on replay. The ring's head
/// can lie below such stale records (another copyset's unapplied entry pins it there), and
/// the replacing entries may all be applied — at or below the checkpoint's index, which replay
/// skips — so replay must not take the stale records in the first place: each copyset page
/// says from which position its entry records count.
#[test]
fn a_replaced_suffix_does_not_come_back_when_another_copyset_pins_the_head() {
    block_on(async {
        // A ring large enough that the checkpoint does not move the stuck entry forward.
        let bdev = device(16 << 20);
        let options = FormatOptions {
            wal_size: 4 << 20,
            ..small_options()
        };
        format(&*bdev, &options, [1; 16]).await.unwrap();
        let (engine, _) = open(&bdev).await;
        let wal = engine.wal().clone();
        let (stuck, copyset) = (CopysetId(3), CopysetId(4));
        let at = |index: u64, term: u64| Entry {
            term: Term(term),
            ..entry(index, Bytes::from(vec![index as u8; 100]))
        };
        // The stuck copyset's entry, never applied, keeps the head below what follows.
        wal.append_entries(stuck, &[at(1, 1)]).unwrap();
        // Entries 1..=10 of term 1; then a leader of term 2 replaces 6..=10 with 6..=8.
        let first: Vec<Entry> = (1..=10).map(|i| at(i, 1)).collect();
        let lsn = wal.append_entries(copyset, &first).unwrap();
        wal.sync(lsn).await.unwrap();
        let second: Vec<Entry> = (6..=8).map(|i| at(i, 2)).collect();
        let lsn = wal.append_entries(copyset, &second).unwrap();
        wal.sync(lsn).await.unwrap();
        let shape = |engine: &ShardEngine<AnyBdev>| {
            engine
                .wal()
                .with_log(copyset, |log| {
                    (log.last(), LogStorage::term(log, log.last()).ok())
                })
                .unwrap()
        };
        assert_eq!(shape(&engine), (LogIndex(8), Some(Term(2))));
        engine.set_applied(copyset, LogIndex(8));
        engine.checkpoint().await.unwrap();
        drop(engine);
        let (engine, recovery) = open(&bdev).await;
        assert_eq!(
            shape(&engine),
            (LogIndex(8), Some(Term(2))),
            "the replaced entries 9 and 10 of term 1 came back"
        );
        assert_eq!(recovery.wal_skipped, 0);
        let stuck_last = engine.wal().with_log(stuck, |log| log.last()).unwrap();
        assert_eq!(stuck_last, LogIndex(1));
    });
}
