use super::*;
use crate::storage::bdev::AnyBdev;
use crate::storage::test_device;
use bytes::Bytes;
use futures_lite::future::block_on;
use glommio::LocalExecutorBuilder;
use raftcore::{EntryKind, LogIndex, LogStorage, SnapshotMeta, Term};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RING: u64 = 1 << 20;

fn config(ring_size: u64, max_batch: u64) -> WalConfig {
    WalConfig {
        ring_offset: 8192,
        ring_size,
        block_size: 4096,
        max_batch,
    }
}

fn entry(index: u64, term: u64, len: usize) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: Bytes::from(vec![(index % 251) as u8; len]),
    }
}

fn device() -> Rc<AnyBdev> {
    test_device::device(8192 + RING + 8192)
}

async fn fresh(bdev: &Rc<AnyBdev>, config: WalConfig) -> ShardWal<AnyBdev> {
    ShardWal::recover(Rc::clone(bdev), config, 0, BTreeMap::new())
        .await
        .unwrap()
        .0
}

#[test]
fn appends_from_many_copysets_are_group_committed_and_recovered() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let bdev = device();
            let wal = fresh(&bdev, config(RING, 256 << 10)).await;
            let mut tasks = Vec::new();
            for copyset in 1..=8u64 {
                let wal = wal.clone();
                tasks.push(glommio::spawn_local(async move {
                    for index in 1..=20 {
                        let lsn = wal
                            .append_entries(CopysetId(copyset), &[entry(index, 1, 1000)])
                            .unwrap();
                        let hs = HardState {
                            term: Term(1),
                            vote: None,
                            commit: LogIndex(index),
                        };
                        let lsn = wal.set_hard_state(CopysetId(copyset), hs).unwrap().max(lsn);
                        wal.sync(lsn).await.unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await;
            }
            let stats = wal.stats();
            assert_eq!(stats.records, 8 * 20 * 2);
            assert!(
                stats.batches <= 8 * 20 / 4,
                "group commit wrote {} batches for 160 syncs",
                stats.batches
            );
            let before = wal.logs();
            drop(wal);
            let (again, report) = ShardWal::recover(
                Rc::clone(&bdev),
                config(RING, 256 << 10),
                0,
                BTreeMap::new(),
            )
            .await
            .unwrap();
            assert_eq!(report.records, 320, "{report:?}");
            for copyset in 1..=8 {
                let log = &before[&CopysetId(copyset)];
                again.with_log(CopysetId(copyset), |recovered| {
                    assert_eq!(recovered.hard_state, log.hard_state);
                    assert_eq!(recovered.last_index(), Ok(LogIndex(20)));
                    assert_eq!(
                        recovered.entries(LogIndex(1), LogIndex(21), u64::MAX),
                        log.entries(LogIndex(1), LogIndex(21), u64::MAX)
                    );
                });
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn the_ring_wraps_and_replay_starts_at_the_head() {
    block_on(async {
        for seed in 0..5u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let bdev = device();
            let config = config(64 << 10, 16 << 10);
            let wal = fresh(&bdev, config).await;
            let mut index = 0;
            let mut checkpoint_index = 0;
            // Three laps; the head follows a little behind the tail, as checkpoints would.
            while wal.durable() < 3 * config.ring_size {
                index += 1;
                let len = rng.gen_range(0..9000);
                let lsn = match wal.append_entries(CopysetId(1), &[entry(index, 1, len)]) {
                    Ok(lsn) => lsn,
                    Err(StorageError::WalFull { .. }) => {
                        // Everything is applied: a checkpoint at `index` reclaims it all.
                        index -= 1;
                        wal.advance_head(wal.durable());
                        checkpoint_index = index;
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                wal.sync(lsn).await.unwrap();
                wal.with_log_mut(CopysetId(1), |log| {
                    log.applied = LogIndex(index);
                });
                if wal.budget().due(wal.used()) {
                    let applied = index.saturating_sub(2);
                    let head =
                        wal.with_log(CopysetId(1), |log| log.first_needed_lsn(LogIndex(applied)));
                    if let Some(Some(head)) = head {
                        if head > wal.head() {
                            wal.advance_head(head);
                            checkpoint_index = applied;
                        }
                    }
                }
            }
            let head = wal.head();
            let checkpoint_term = wal
                .with_log(CopysetId(1), |log| log.term(LogIndex(checkpoint_index)))
                .unwrap()
                .unwrap();
            drop(wal);
            // What a checkpoint at `checkpoint_index` would have stored.
            let checkpointed = CopysetLog::from_checkpoint(
                HardState::default(),
                ConfState::default(),
                SnapshotMeta {
                    index: LogIndex(checkpoint_index),
                    term: checkpoint_term,
                    conf_state: ConfState::default(),
                },
            );
            let logs = BTreeMap::from([(CopysetId(1), checkpointed)]);
            let (again, report) = ShardWal::recover(Rc::clone(&bdev), config, head, logs)
                .await
                .unwrap();
            // Replay starts at the head, so the log begins wherever the head's record was and
            // runs to the last index without gaps.
            assert_eq!(report.skipped, 0, "seed {seed}: {report:?}");
            let last = again.with_log(CopysetId(1), |log| log.last()).unwrap();
            assert_eq!(last, LogIndex(index), "seed {seed}: {report:?}");
            assert!(
                // The end: zeroes, a record of an older lap, or an older lap's bytes that
                // are not a record's start.
                report.stop.contains("zeroes")
                    || report.stop.contains("stale")
                    || report.stop.contains("bad magic"),
                "seed {seed}: {report:?}"
            );
        }
    });
}

#[test]
fn a_corrupt_record_ends_replay_and_later_appends_do_not_resurrect_what_followed() {
    block_on(async {
        let bdev = device();
        let config = config(RING, 64 << 10);
        let wal = fresh(&bdev, config).await;
        let mut positions = Vec::new();
        for index in 1..=10 {
            let lsn = wal
                .append_entries(CopysetId(1), &[entry(index, 1, 5000)])
                .unwrap();
            wal.sync(lsn).await.unwrap();
            positions.push(lsn);
        }
        drop(wal);
        // Damage entry 6's record (it starts where entry 5's ended, rounded to its batch).
        let sixth = align_up(positions[4], 4096);
        test_device::modify(&bdev, |image| image[(8192 + sixth + 100) as usize] ^= 0x40).await;
        let (wal, report) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(report.records, 5, "{report:?}");
        assert!(report.stop.contains("checksum"), "{}", report.stop);
        assert_eq!(wal.with_log(CopysetId(1), |l| l.last()), Some(LogIndex(5)));
        // A new, shorter entry 6 is written where the damaged one was; entries 7..10 of the
        // old lap must not come back after it.
        let lsn = wal
            .append_entries(CopysetId(1), &[entry(6, 2, 10)])
            .unwrap();
        wal.sync(lsn).await.unwrap();
        drop(wal);
        let (wal, _) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
            .await
            .unwrap();
        wal.with_log(CopysetId(1), |log| {
            assert_eq!(log.last(), LogIndex(6));
            assert_eq!(log.term(LogIndex(6)), Ok(Term(2)));
        });
    });
}

#[test]
fn a_full_ring_is_back_pressure_and_oversized_records_are_refused() {
    block_on(async {
        let bdev = device();
        let config = config(64 << 10, 16 << 10);
        let wal = fresh(&bdev, config).await;
        let error = wal
            .append_entries(CopysetId(1), &[entry(1, 1, 20 << 10)])
            .unwrap_err();
        assert!(
            matches!(error, StorageError::RecordTooLarge { .. }),
            "{error}"
        );
        let mut index = 0;
        let full = loop {
            index += 1;
            match wal.append_entries(CopysetId(1), &[entry(index, 1, 3000)]) {
                Ok(lsn) => wal.sync(lsn).await.unwrap(),
                Err(error) => break error,
            }
        };
        assert!(matches!(full, StorageError::WalFull { .. }), "{full}");
        // Nothing is applied, so every entry is live: the ring keeps room to move them all
        // forward besides one batch, and takes fewer than half its size in them.
        let live = wal.live_bytes();
        assert!(index > 2, "{index} entries");
        assert!(live < config.ring_size / 2, "{live} live bytes");
        assert!(wal.budget().fits(wal.used(), live));
        // Control records still fit (a vote after the entries).
        let hs = HardState {
            term: Term(2),
            vote: Some(raftcore::NodeId(1)),
            commit: LogIndex(0),
        };
        wal.set_hard_state(CopysetId(1), hs).unwrap();
    });
}

/// Entries that cannot be applied move forward at a checkpoint instead of pinning the head;
/// a crash that tears the moved copies loses none of them on replay (a copy of an entry with
/// the same term leaves the entries after it in the log).
#[test]
fn live_entries_move_forward_and_a_torn_move_loses_nothing() {
    block_on(async {
        let bdev = device();
        let config = config(256 << 10, 16 << 10);
        let wal = fresh(&bdev, config).await;
        // Copyset 1: five entries that never apply (no quorum), at the start of the ring.
        let mut lsn = 0;
        for index in 1..=5 {
            lsn = wal
                .append_entries(CopysetId(1), &[entry(index, 1, 3000)])
                .unwrap();
        }
        wal.sync(lsn).await.unwrap();
        let pinned = wal.with_log(CopysetId(1), |l| l.first_needed_lsn(l.applied));
        assert_eq!(pinned, Some(Some(0)));
        // Copyset 2 writes and applies a good part of the ring after them.
        for index in 1..=30 {
            lsn = wal
                .append_entries(CopysetId(2), &[entry(index, 1, 3000)])
                .unwrap();
            wal.with_log_mut(CopysetId(2), |log| log.applied = LogIndex(index));
        }
        wal.sync(lsn).await.unwrap();
        let live = wal.live_bytes();
        assert_eq!(live, 5 * (3000 + HEADER_LEN as u64));
        let (copysets, bytes) = wal.move_live_entries(wal.appended());
        assert_eq!((copysets, bytes), (1, live));
        let moved_from = wal
            .with_log(CopysetId(1), |l| l.first_needed_lsn(l.applied))
            .flatten()
            .unwrap();
        assert!(moved_from >= lsn, "moved to {moved_from}, after {lsn}");
        // Sync only part of the move: the copies of entries 1..3 reach the disk, the rest is
        // torn away (zeroed), as a crash in the middle of the batch would leave them.
        let moved_end = wal.appended();
        wal.sync(moved_end).await.unwrap();
        let torn_from = moved_from + 3 * (3000 + HEADER_LEN as u64);
        test_device::modify(&bdev, |image| {
            let from = (8192 + torn_from % config.ring_size) as usize;
            let to = (8192 + align_up(moved_end, 4096) % config.ring_size) as usize;
            image[from..to].fill(0);
        })
        .await;
        drop(wal);
        let (wal, _) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
            .await
            .unwrap();
        wal.with_log(CopysetId(1), |log| {
            assert_eq!(log.last(), LogIndex(5), "no entry lost");
            let first = log.first_needed_lsn(LogIndex(0)).unwrap();
            assert_eq!(
                first,
                3 * (3000 + HEADER_LEN as u64),
                "entry 4 still at its old place"
            );
            assert_eq!(log.live_bytes(), live);
        });
    });
}

/// The argument of docs/architecture.md, "WAL space", against the budget's own formulas: over
/// random rings and random runs of admitted client data, control records, applies and
/// checkpoints (each leaving, at worst, the live bytes moved forward with all their padding and
/// a pad to the ring's end in the middle), a control record always fits — at once, or after
/// one checkpoint.
#[test]
fn the_budget_always_leaves_room_for_control_records_after_a_checkpoint() {
    for seed in 0..200u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let block = 4096u64;
        let ring = block * rng.gen_range(64..65536u64);
        let max_batch = ((4u64 << 20).min(ring / 4)).max(block) / block * block;
        let budget = WalBudget {
            ring,
            max_batch,
            block,
        };
        let (mut used, mut live) = (0u64, 0u64);
        // Half the seeds never apply: their copysets are stuck, the case that matters.
        let applies = seed % 2 == 0;
        for step in 0..2000 {
            match rng.gen_range(0..if applies { 10 } else { 8 }) {
                0..=4 => {
                    // Client data: admitted or refused, never more.
                    let incoming = rng.gen_range(1..(max_batch - block).max(2));
                    if budget.admits(used, live, incoming) {
                        used += incoming;
                        live += incoming;
                    }
                }
                5..=7 => {
                    // A control record (a vote, a commit index, a membership).
                    let record = rng.gen_range(64..600u64);
                    if !budget.fits(used + record, live) {
                        // The checkpoint moves every live entry: at worst its room.
                        used = budget.moving_room(live);
                        assert!(
                            budget.fits(used + record, live),
                            "seed {seed} step {step}: ring {ring}, live {live}, used {used}"
                        );
                    }
                    used += record;
                }
                8 => {
                    // Applies: fewer live bytes, the same ring use.
                    live -= rng.gen_range(0..=live);
                }
                _ => {
                    // A routine checkpoint: what is applied goes (the live bytes may sit
                    // anywhere, so at worst nothing is reclaimed unless they move).
                    if budget.due(used) && budget.worth_moving(used) {
                        used = budget.moving_room(live).min(used);
                    }
                }
            }
            assert!(
                budget.fits(used, live),
                "seed {seed} step {step}: the move must fit"
            );
        }
    }
}

/// Every record size around the batch limit, alone and after another record: each is placed
/// with room for the pad record that seals its batch, or refused as too large — never the
/// seal's assertion (a client chooses the size of its writes).
#[test]
fn records_whose_padding_would_overflow_the_batch_are_placed_elsewhere_or_refused() {
    block_on(async {
        let config = config(RING, 16 << 10);
        for len in (16 << 10) - 200..(16 << 10) + 8 {
            let bdev = device();
            let wal = fresh(&bdev, config).await;
            match wal.append_entries(CopysetId(1), &[entry(1, 1, len)]) {
                Ok(lsn) => wal.sync(lsn).await.unwrap(),
                Err(StorageError::RecordTooLarge { .. }) => {}
                Err(error) => panic!("{len}: {error}"),
            }
            // After a first record of 1000 bytes, a second one of `len - 1000 - 48`.
            let wal = fresh(&device(), config).await;
            let first = wal
                .append_entries(CopysetId(2), &[entry(1, 1, 1000)])
                .unwrap();
            let second_len = len.saturating_sub(1000 + HEADER_LEN);
            let lsn = match wal.append_entries(CopysetId(2), &[entry(2, 1, second_len)]) {
                Ok(lsn) => lsn,
                Err(StorageError::RecordTooLarge { .. }) => first,
                Err(error) => panic!("{len}: {error}"),
            };
            wal.sync(lsn).await.unwrap();
        }
    });
}

/// Issue 25, item 5: damage before the ring's tail is not taken for a torn tail. A crash tears
/// at most the batch in flight, so a valid record more than a batch past where replay stops
/// means the ring is damaged in the middle: recovery refuses (silently stopping there would
/// drop acknowledged entries and votes written after the damage). Damage within the last
/// batch is a torn tail and recovers as before.
#[test]
fn damage_before_the_tail_is_refused_and_a_torn_tail_is_not() {
    block_on(async {
        let config = config(RING, 16 << 10);
        let bdev = device();
        let wal = fresh(&bdev, config).await;
        let mut positions = Vec::new();
        for index in 1..=40 {
            let lsn = wal
                .append_entries(CopysetId(1), &[entry(index, 1, 5000)])
                .unwrap();
            wal.sync(lsn).await.unwrap();
            positions.push(lsn);
        }
        drop(wal);
        let image_before = test_device::image(&bdev).await;
        // The last record's batch, torn: a torn tail.
        let last = align_up(positions[38], 4096);
        test_device::modify(&bdev, |image| image[(8192 + last + 100) as usize] ^= 0x40).await;
        let (_, report) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
            .await
            .expect("a torn tail recovers");
        assert_eq!(report.records, 39, "{report:?}");
        // Entry 6 damaged with 34 valid records after it: refused.
        test_device::write_image(&bdev, &image_before).await;
        let sixth = align_up(positions[4], 4096);
        test_device::modify(&bdev, |image| image[(8192 + sixth + 100) as usize] ^= 0x40).await;
        let refused = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new()).await;
        match refused {
            Err(StorageError::CorruptMetadata { reason, .. }) => {
                assert!(reason.contains("damaged before its tail"), "{reason}")
            }
            other => panic!(
                "damage before the tail was not refused: {:?}",
                other.map(|(_, r)| r)
            ),
        }
    });
}

/// A torn tail leaves the torn record's header in the middle of a block; what the next run
/// appends after it, acknowledged and synced, must be found by the recovery after that (the
/// realistic fault run lost such records: the next scan stopped at the old torn header again,
/// and the next recovery zeroed the records that followed it).
#[test]
fn records_appended_after_a_torn_tail_survive_the_next_restart() {
    block_on(async {
        let config = config(RING, 16 << 10);
        let bdev = device();
        let wal = fresh(&bdev, config).await;
        for index in 1..=8 {
            let lsn = wal
                .append_entries(CopysetId(1), &[entry(index, 1, 900)])
                .unwrap();
            wal.sync(lsn).await.unwrap();
        }
        // The last batch holds entries 9 and 10: entry 10's record starts mid-block.
        let batch = wal.appended();
        let lsn = wal
            .append_entries(CopysetId(1), &[entry(9, 1, 900), entry(10, 1, 900)])
            .unwrap();
        wal.sync(lsn).await.unwrap();
        drop(wal);
        let record = (48 + 900) as u64;
        let torn_at = batch + record;
        assert_ne!(torn_at % 4096, 0, "the torn record must start mid-block");
        // Tear entry 10's payload; its header stays readable.
        test_device::modify(&bdev, |image| {
            image[(8192 + torn_at + record - 10) as usize] ^= 0x40
        })
        .await;
        let (wal, report) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
            .await
            .expect("a torn tail recovers");
        assert_eq!(report.records, 9, "{report:?}");
        // This run appends and syncs entries 10 to 40: acknowledged, so they must survive.
        for index in 10..=40 {
            let lsn = wal
                .append_entries(CopysetId(1), &[entry(index, 2, 900)])
                .unwrap();
            wal.sync(lsn).await.unwrap();
        }
        drop(wal);
        for restart in 0..2 {
            let (wal, report) = ShardWal::recover(Rc::clone(&bdev), config, 0, BTreeMap::new())
                .await
                .unwrap_or_else(|e| panic!("restart {restart}: {e}"));
            assert_eq!(report.records, 9 + 31, "restart {restart}: {report:?}");
            let last = wal.with_log(CopysetId(1), |log| log.last()).unwrap();
            assert_eq!(last, LogIndex(40), "restart {restart}");
            drop(wal);
        }
    });
}
