//! Volume snapshots' chunk-level parts (issue 21): the fence, and the cost of first writes
//! after a snapshot.

use super::*;

/// Issue 21: a fence raises a chunk's sequence number without writing — its data becomes
/// the snapshot at the old number, a write of the old number is refused, one of the new
/// number goes through and leaves the snapshot as it was — and leaves an absent chunk absent;
/// after a restart the fenced chunk is as it was.
#[test]
fn a_fence_snapshots_a_chunk_without_writing_and_refuses_older_writes() {
    block_on(async {
        let bdev = formatted(16 << 20).await;
        let (engine, _) = open(&bdev).await;
        engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 1), 1, LogIndex(0))
            .await
            .unwrap();
        engine
            .fence_chunk(ChunkId(1), 2, LogIndex(0))
            .await
            .unwrap();
        engine
            .fence_chunk(ChunkId(9), 2, LogIndex(0))
            .await
            .unwrap();
        assert!(matches!(
            engine.chunk_info(ChunkId(9)),
            Err(StorageError::ChunkNotFound(_))
        ));
        let info = engine.chunk_info(ChunkId(1)).unwrap();
        assert_eq!((info.sn, info.snapshot_sn), (2, Some(1)));
        let error = engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 7), 1, LogIndex(0))
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::BackwardRequest { .. }),
            "{error}"
        );
        engine
            .write_chunk(ChunkId(1), 0, buffer(&engine, PAGE, 3), 2, LogIndex(0))
            .await
            .unwrap();
        // Fencing again at the same or an older number changes nothing.
        engine
            .fence_chunk(ChunkId(1), 2, LogIndex(0))
            .await
            .unwrap();
        engine
            .fence_chunk(ChunkId(1), 1, LogIndex(0))
            .await
            .unwrap();
        let old = engine.read_snapshot(ChunkId(1), 1, 0, PAGE).await.unwrap();
        let new = engine.read_chunk(ChunkId(1), 0, PAGE).await.unwrap();
        assert_eq!(old.as_slice(), buffer(&engine, PAGE, 1).as_slice());
        assert_eq!(new.as_slice(), buffer(&engine, PAGE, 3).as_slice());
        engine.checkpoint().await.unwrap();
        drop(engine);
        let (engine, _) = open(&bdev).await;
        let old = engine.read_snapshot(ChunkId(1), 1, 0, PAGE).await.unwrap();
        assert_eq!(old.as_slice(), buffer(&engine, PAGE, 1).as_slice());
        assert_eq!(engine.chunk_info(ChunkId(1)).unwrap().sn, 2);
    });
}

/// Issue 21's cost of a snapshot: first writes to many pages at once share the checkpoints
/// that make their copies durable (a handful, not one each), and after a restart without a
/// further checkpoint the snapshot still reads every page's old version.
#[test]
fn concurrent_first_writes_after_a_snapshot_share_checkpoints_and_keep_the_old_pages() {
    block_on(async {
        let bdev = formatted(16 << 20).await;
        let (engine, _) = open(&bdev).await;
        let pages = 16u64; // a whole chunk of the test geometry
        engine
            .write_chunk(
                ChunkId(1),
                0,
                buffer(&engine, pages * PAGE, 1),
                1,
                LogIndex(0),
            )
            .await
            .unwrap();
        engine
            .fence_chunk(ChunkId(1), 2, LogIndex(0))
            .await
            .unwrap();
        let before = engine.checkpoint.borrow().generation;
        let writes: Vec<_> = (0..pages)
            .map(|p| {
                let data = buffer(&engine, PAGE, 2);
                engine.write_chunk(ChunkId(1), p * PAGE, data, 2, LogIndex(0))
            })
            .collect();
        let writes: Vec<crate::volume::LocalFuture<'_, Result<(), StorageError>>> = writes
            .into_iter()
            .map(|f| Box::pin(f) as crate::volume::LocalFuture<'_, _>)
            .collect();
        for written in crate::volume::join_all(writes).await {
            written.unwrap();
        }
        let checkpoints = engine.checkpoint.borrow().generation - before;
        assert!(
            checkpoints <= 4,
            "{checkpoints} checkpoints for {pages} concurrent first writes"
        );
        drop(engine);
        let (engine, _) = open(&bdev).await;
        let old = engine
            .read_snapshot(ChunkId(1), 1, 0, pages * PAGE)
            .await
            .unwrap();
        assert_eq!(old.as_slice(), buffer(&engine, pages * PAGE, 1).as_slice());
        let new = engine
            .read_chunk(ChunkId(1), 0, pages * PAGE)
            .await
            .unwrap();
        assert_eq!(new.as_slice(), buffer(&engine, pages * PAGE, 2).as_slice());
    });
}
