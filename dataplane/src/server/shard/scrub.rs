//! Scrub on the shard (`crate::scrub` has the whole story): applying `ChunkOp::Scrub` — the
//! range's page sums, kept by entry index for the scrubber to collect with `SCRUB_RESULT` —
//! and `ChunkOp::Repair`.

use std::collections::VecDeque;

use bytes::Bytes;
use raftcore::LogIndex;

use super::ShardServer;
use crate::ids::{ChunkId, CopysetId};
use crate::protocol::Status;
use crate::scrub::{page_sums, RangeSums};
use crate::storage::bdev::Bdev;
use crate::storage::engine::ShardEngine;
use crate::storage::StorageError;

/// Results kept per shard: enough for every replica's scrubber to collect a round of ranges
/// of many copysets at once; older ones are dropped first.
const KEPT: usize = 1024;

/// The sums this shard's replicas took, by copyset and entry index, newest last.
#[derive(Default)]
pub(super) struct ScrubResults {
    kept: VecDeque<((CopysetId, u64), Bytes)>,
}

impl ScrubResults {
    pub(super) fn keep(&mut self, copyset: CopysetId, index: u64, sums: Bytes) {
        if self.kept.len() == KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(((copyset, index), sums));
    }

    fn get(&self, copyset: CopysetId, index: u64) -> Option<Bytes> {
        self.kept
            .iter()
            .rev()
            .find(|(key, _)| *key == (copyset, index))
            .map(|(_, sums)| sums.clone())
    }
}

/// Applies a scrub entry: the crc32c of each page of `offset..offset + len` of `chunk` as this
/// replica holds it now (after every earlier entry of the chunk, before every later one).
pub(super) async fn apply_scrub<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    (chunk, offset, len): (ChunkId, u32, u32),
    index: LogIndex,
) -> Result<RangeSums, StorageError> {
    engine.check_owner(chunk, copyset)?;
    let page = engine.layout().geometry.page_size as usize;
    match engine
        .read_chunk(chunk, u64::from(offset), u64::from(len))
        .await
    {
        Ok(data) => Ok(RangeSums {
            index: index.0,
            present: true,
            pages: page_sums(data.as_slice(), page),
        }),
        Err(StorageError::ChunkNotFound(_)) => Ok(RangeSums {
            index: index.0,
            present: false,
            pages: Vec::new(),
        }),
        Err(error) => Err(error),
    }
}

/// Applies a repair entry: writes `data` at `offset` of `chunk` only where the page still has
/// the checksum `bad` this replica reported — on the replicas that agreed, and on every replica
/// once a later write changed the page, it leaves the page alone.
pub(super) async fn apply_repair<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    (chunk, offset, data): (ChunkId, u32, Bytes),
    bad: u32,
    index: LogIndex,
) -> Result<bool, StorageError> {
    engine.check_owner(chunk, copyset)?;
    let offset = u64::from(offset);
    let current = match engine.read_chunk(chunk, offset, data.len() as u64).await {
        Ok(current) => current,
        Err(StorageError::ChunkNotFound(_)) => return Ok(false),
        Err(error) => return Err(error),
    };
    if crc32c::crc32c(current.as_slice()) != bad {
        engine.note_applied(copyset, chunk, index);
        return Ok(false);
    }
    // The chunk's own sequence number: a plain overwrite, no copy-on-write.
    let sn = engine.chunk_info(chunk)?.sn;
    engine
        .write_chunk_bytes(copyset, chunk, offset, data, sn, index)
        .await?;
    Ok(true)
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Keeps the sums a scrub entry gave, for `SCRUB_RESULT`.
    pub(super) fn keep_scrub(&self, copyset: CopysetId, sums: &RangeSums) -> Bytes {
        let encoded = sums.encode();
        self.scrubs
            .borrow_mut()
            .keep(copyset, sums.index, encoded.clone());
        encoded
    }

    /// `SCRUB_RESULT` (body: the scrub entry's index, u64): this replica's sums of that entry;
    /// `Retry` while it has not applied it yet, `Invalid` once the sums are gone.
    pub(super) fn serve_scrub_result(&self, copyset: CopysetId, payload: &[u8]) -> (Status, Bytes) {
        let Ok(word) = <[u8; 8]>::try_from(payload) else {
            return (
                Status::Invalid("a scrub result request is an entry index (u64)".into()),
                Bytes::new(),
            );
        };
        let index = u64::from_le_bytes(word);
        if let Some(sums) = self.scrubs.borrow().get(copyset, index) {
            return (Status::Ok, sums);
        }
        let applied = self
            .copysets
            .borrow()
            .get(&copyset)
            .map(|core| core.borrow().applied().0);
        match applied {
            None => (Status::CopysetNotFound, Bytes::new()),
            Some(applied) if applied < index => (
                Status::Retry(format!("entry {index} not applied yet (applied {applied})")),
                Bytes::new(),
            ),
            Some(_) => (
                Status::Invalid(format!(
                    "no sums of entry {index} here (applied before this process started, or \
                     dropped for newer ones)"
                )),
                Bytes::new(),
            ),
        }
    }
}
