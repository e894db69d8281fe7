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

mod alloc;
mod images;
mod snapshots;
mod wal;
