//! The slot pool's bound between checkpoints under concurrency and crashes (issues 23, 25).

use std::rc::Rc;

use futures_lite::future::block_on;
use raftcore::LogIndex;

use super::*;
use crate::storage::bdev::fault::{CrashMode, FaultBdev};
use crate::storage::bdev::{Bdev, MemBdev};
use crate::storage::crash_tests::{options, JoinAll, Task, DEVICE, PAGE};
use crate::storage::dma::DmaBuf;
use crate::storage::table::ChunkId;
use crate::storage::StorageError;

/// Issue 23: the bound on slot allocations between checkpoints (recovery zeroes only the
/// `RECOVERY_ZERO_SLOTS` lowest free slots) holds under concurrent creations. It used to be
/// checked once before an await: a creation that found a possibly dirty slot zeroed it and
/// took the next without checking again, and a checkpoint reset the count of allocations it
/// had not recorded — both let more slots be taken than a crash would zero.
#[test]
fn concurrent_creations_never_take_more_slots_between_checkpoints_than_recovery_zeroes() {
    block_on(async {
        let memory = MemBdev::new(DEVICE, 4096, 64 << 20).unwrap();
        format(&memory, &options(), [3; 16]).await.unwrap();
        // An unclean stop: the next start marks the lowest free slots possibly dirty.
        let image = {
            let device = Rc::new(FaultBdev::new(memory, 1));
            let (engine, _) = ShardEngine::open(Rc::clone(&device), 0, EngineOptions::default())
                .await
                .unwrap();
            engine
                .write_chunk(ChunkId(1), 0, page(&engine, 1), 1, LogIndex(0))
                .await
                .unwrap();
            drop(engine);
            device.crash(CrashMode::LoseAll)
        };
        let memory = MemBdev::from_image(image, 4096, 64 << 20).unwrap();
        let device = Rc::new(FaultBdev::new(memory, 2));
        let (engine, recovery) = ShardEngine::open(Rc::clone(&device), 0, EngineOptions::default())
            .await
            .unwrap();
        assert!(recovery.possibly_dirty_slots > 0);
        let shared = &engine;
        let mut futures: Vec<Option<Task<'_>>> = Vec::new();
        for creator in 0..6u64 {
            futures.push(Some(Box::pin(async move {
                for i in 0..10 {
                    let chunk = ChunkId(100 + creator * 100 + i);
                    shared
                        .write_chunk(chunk, 0, page(shared, 2), 1, LogIndex(0))
                        .await
                        .map_err(|e| e.to_string())?;
                    let taken = shared.allocations_since_checkpoint();
                    if taken > RECOVERY_ZERO_SLOTS {
                        return Err(format!(
                            "{taken} slots taken since the last checkpoint, more than the \
                             {RECOVERY_ZERO_SLOTS} recovery zeroes"
                        ));
                    }
                }
                Ok(())
            })));
        }
        JoinAll {
            futures,
            failure: None,
        }
        .await
        .unwrap();
        let created = engine.chunk_ids().iter().filter(|c| c.0 >= 100).count();
        assert_eq!(created, 6 * 10);
        // The power goes with writes in flight; every slot the creations took since the last
        // checkpoint may hold their bytes. A new chunk in any free slot reads zeroes where it
        // was not written.
        drop(engine);
        let image = device.crash(CrashMode::Random);
        let memory = MemBdev::from_image(image, 4096, 64 << 20).unwrap();
        let device = Rc::new(FaultBdev::new(memory, 3));
        let (engine, _) = ShardEngine::open(Rc::clone(&device), 0, EngineOptions::default())
            .await
            .unwrap();
        let mut fresh = 0;
        for i in 0.. {
            let chunk = ChunkId(10_000 + i);
            match engine
                .write_chunk(chunk, PAGE, page(&engine, 7), 1, LogIndex(0))
                .await
            {
                Ok(()) => {}
                Err(StorageError::Table(_)) => break, // the pool is used up
                Err(error) => panic!("{error}"),
            }
            let read = engine.read_chunk(chunk, 0, PAGE).await.unwrap();
            assert!(
                read.as_slice().iter().all(|b| *b == 0),
                "a new chunk in a reused slot reads bytes from before the crash"
            );
            fresh += 1;
        }
        assert!(fresh > 0);
    });
}

/// One page of `fill`.
fn page<B: Bdev>(engine: &ShardEngine<B>, fill: u8) -> DmaBuf {
    let mut buffer = engine.bdev().alloc(PAGE as usize).unwrap();
    buffer.as_mut_slice().unwrap().fill(fill);
    buffer
}
