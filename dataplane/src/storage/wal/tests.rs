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
                        index -= 1;
                        wal.advance_head(wal.durable());
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                wal.sync(lsn).await.unwrap();
                wal.with_log_mut(CopysetId(1), |log| {
                    log.applied = LogIndex(index);
                });
                if wal.used() > config.ring_size / 2 {
                    let applied = index.saturating_sub(2);
                    let head =
                        wal.with_log(CopysetId(1), |log| log.first_needed_lsn(LogIndex(applied)));
                    if let Some(Some(head)) = head {
                        wal.advance_head(head);
                        checkpoint_index = applied;
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
            assert!(report.stop.contains("zeroes") || report.stop.contains("stale"));
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
        assert!(index > 10);
    });
}
