//! The WAL inside the engine: copyset pages, pinning, history kept, replay after restarts.

use super::*;

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

/// Issue 25, item 4: a membership change whose record the full WAL refused must not be lost
/// at a restart. The shell holds the applied index below the change until the record is in;
/// a checkpoint meanwhile records the old membership with the old index, so the restart
/// applies the change again (its entry is above the applied index, in the log).
#[test]
fn a_membership_change_the_full_wal_refused_is_not_lost_at_a_restart() {
    block_on(async {
        let bdev = formatted(8 << 20).await;
        let (engine, _) = open(&bdev).await;
        let wal = engine.wal().clone();
        let (copyset, busy) = (CopysetId(3), CopysetId(4));
        let voters = |ids: &[u64]| raftcore::ConfState {
            voters: ids.iter().map(|i| NodeId(*i)).collect(),
            ..Default::default()
        };
        wal.set_conf_state(copyset, voters(&[1, 2, 3])).unwrap();
        // Entries 1..=5 of the copyset; the fifth adds node 4. All committed.
        let entries: Vec<Entry> = (1..=5)
            .map(|i| entry(i, Bytes::from(vec![i as u8; 64])))
            .collect();
        wal.append_entries(copyset, &entries).unwrap();
        let hs = HardState {
            term: Term(1),
            vote: Some(NodeId(1)),
            commit: LogIndex(5),
        };
        let lsn = wal.set_hard_state(copyset, hs).unwrap();
        wal.sync(lsn).await.unwrap();
        engine.set_applied(copyset, LogIndex(4));
        // Another copyset's unapplied entries fill the ring, then votes fill the rest.
        let mut index = 0;
        while wal
            .append_entries(busy, &[entry(index + 1, Bytes::from(vec![1u8; 2000]))])
            .is_ok()
        {
            index += 1;
        }
        let vote = HardState {
            term: Term(1),
            vote: Some(NodeId(2)),
            commit: LogIndex(0),
        };
        while wal.set_hard_state(busy, vote).is_ok() {}
        // The change is applied, and its record is refused.
        let refused = wal.set_conf_state(copyset, voters(&[1, 2, 3, 4]));
        assert!(
            matches!(refused, Err(StorageError::WalFull { .. })),
            "{refused:?}"
        );
        engine.hold_applied_below(copyset, LogIndex(5));
        engine.set_applied(copyset, LogIndex(5));
        // A checkpoint (it makes room), then a crash before the record made it.
        engine.checkpoint().await.unwrap();
        drop(engine);
        let (engine, recovery) = open(&bdev).await;
        let recovered = recovery
            .copysets
            .iter()
            .find(|c| c.copyset == copyset)
            .expect("the copyset is back");
        let knows_node_4 = recovered.conf_state.voters.contains(&NodeId(4));
        let reapplies_the_change = recovered.applied < LogIndex(5)
            && recovered.to_apply.iter().any(|e| e.index == LogIndex(5));
        assert!(
            knows_node_4 || reapplies_the_change,
            "membership lost: applied {}, voters {:?}",
            recovered.applied,
            recovered.conf_state.voters
        );
        drop(engine);
    });
}
