//! Chunk operations: the slot pool, writes, reads and deletes, and the applied index each
//! chunk records.

use std::collections::BTreeSet;

use bytes::Bytes;
use raftcore::LogIndex;

use super::{ChunkInfo, ShardEngine, RECOVERY_ZERO_SLOTS};
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::table::{ChunkId, SlotMeta, SlotState, TableError, FLAG_CLONE, NO_SLOT};
use crate::storage::wal::record::CopysetId;
use crate::storage::StorageError;

impl<B: Bdev> ShardEngine<B> {
    /// Takes a slot from the pool, first running a checkpoint if the allocations since the
    /// last one reached the bound recovery relies on.
    pub(super) async fn allocate(&self, meta: SlotMeta) -> Result<u32, StorageError> {
        loop {
            // Checked at every turn, since each await below lets other tasks allocate: from
            // here to the count's increment nothing awaits.
            while self.checkpoint.borrow().allocations >= RECOVERY_ZERO_SLOTS {
                self.checkpoint().await?;
            }
            // The lookup before this call and the allocation are apart by awaits (a
            // checkpoint, zeroing a slot): another copyset may have created the chunk meanwhile.
            // Its creator keeps it; this creation is refused like any write to another
            // copyset's chunk (issue 25, item 1: never an assertion a client can reach).
            if meta.state == SlotState::Chunk {
                let owner = {
                    let table = self.table.borrow();
                    table
                        .lookup(meta.chunk)
                        .and_then(|slot| table.slot(slot).map(|m| m.copyset))
                };
                if let Some(owner) = owner {
                    return Err(StorageError::Conflict {
                        chunk: meta.chunk,
                        reason: format!(
                            "copyset {owner} created the chunk while copyset {} was creating it",
                            meta.copyset
                        ),
                    });
                }
            }
            let allocated = self.table.borrow_mut().allocate(meta);
            let slot = match allocated {
                Ok(slot) => slot,
                // Chunks an install retired hold slots until a checkpoint records the swap
                // that retired them; the checkpoint frees them.
                Err(TableError::NoSpace { .. }) if !self.retired.borrow().is_empty() => {
                    self.checkpoint().await?;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if !self.checkpoint.borrow().maybe_dirty.contains(&slot) {
                let mut state = self.checkpoint.borrow_mut();
                state.allocations += 1;
                assert!(
                    state.allocations <= RECOVERY_ZERO_SLOTS,
                    "more slots taken since the last checkpoint than recovery zeroes"
                );
                return Ok(slot);
            }
            // A slot that may hold bytes from before a crash is zeroed first, while it is
            // marked as being released (so a checkpoint meanwhile records it as such).
            self.table.borrow_mut().release(slot);
            self.bdev
                .write_zeroes(
                    self.layout.slot_offset(slot),
                    self.layout.geometry.chunk_size,
                )
                .await?;
            self.table.borrow_mut().release_done(slot);
            self.checkpoint.borrow_mut().maybe_dirty.remove(&slot);
        }
    }

    /// Slots taken from the pool since the last checkpoint recorded the table.
    #[cfg(test)]
    pub(crate) fn allocations_since_checkpoint(&self) -> u32 {
        self.checkpoint.borrow().allocations
    }

    /// Whether the entry at `index` was already applied to `chunk` (in `slot`): replaying it
    /// must change nothing. Index 0 means "not from the log" and always applies.
    pub(super) fn already_applied(&self, slot: u32, index: LogIndex) -> Result<bool, StorageError> {
        Ok(index.0 != 0 && index.0 <= self.slot_meta(slot)?.applied)
    }

    /// Records that the entry at `index` was applied to `chunk` although it changed nothing
    /// (a refusal every replica makes alike): re-applying it must not be tried again, and a
    /// copy of the chunk made after it covers it.
    pub fn note_applied(&self, copyset: CopysetId, chunk: ChunkId, index: LogIndex) {
        // Only on a chunk of `copyset`: `index` is a position in its log, and stamping another
        // copyset's chunk with it would make that copyset skip its own entries on replay.
        if self.check_owner(chunk, copyset).is_ok() {
            self.record_applied(chunk, index);
        }
    }

    /// Records that the entry at `index` is applied to the chunk in `slot`.
    pub(super) fn record_applied(&self, chunk: ChunkId, index: LogIndex) {
        let mut table = self.table.borrow_mut();
        if let Some(slot) = table.lookup(chunk) {
            if let Some(mut meta) = table.slot(slot).copied() {
                if index.0 > meta.applied {
                    meta.applied = index.0;
                    table.update(slot, meta);
                }
            }
        }
    }

    /// Writes `data` at `offset` of `chunk`, creating the chunk if it does not exist, as the
    /// entry at `index` of the chunk's copyset (0 when not applying a log entry). `sn` is the
    /// write's sequence number: older than the chunk's is refused; newer than the chunk's (and
    /// than its corrected sn) first preserves the pages it overwrites in a snapshot.
    pub async fn write_chunk(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: DmaBuf,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.write_chunk_in(CopysetId(0), chunk, offset, data, sn, index)
            .await
    }

    /// [`write_chunk`](Self::write_chunk) for `copyset`'s log: a chunk it creates is recorded
    /// as that copyset's, and a chunk another copyset wrote is refused.
    pub async fn write_chunk_in(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u64,
        data: DmaBuf,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.check_request(offset, data.len() as u64)?;
        let existing = self.table.borrow().lookup(chunk);
        let slot = match existing {
            Some(slot) => {
                // Ownership first: the chunk's applied index is a position in its own
                // copyset's log, meaningless against another copyset's `index` (which would
                // otherwise pass as "already applied" and be acknowledged unwritten).
                self.check_owner(chunk, copyset)?;
                if self.already_applied(slot, index)? {
                    return Ok(());
                }
                self.check_not_a_clone_source(chunk)?;
                let meta = self.slot_meta(slot)?;
                if sn < meta.sn {
                    return Err(StorageError::BackwardRequest {
                        chunk,
                        sn,
                        chunk_sn: meta.sn,
                    });
                }
                let is_clone = meta.flags & FLAG_CLONE != 0;
                if is_clone && sn > meta.sn.max(meta.aux) {
                    return Err(StorageError::Conflict {
                        chunk,
                        reason: format!(
                            "a write with sn {sn} would snapshot a lazy clone; flatten it first"
                        ),
                    });
                }
                if sn > meta.sn || meta.link != NO_SLOT {
                    self.preserve_for_snapshot(chunk, slot, offset, data.len() as u64, sn)
                        .await?;
                }
                slot
            }
            None => {
                self.allocate(SlotMeta {
                    chunk,
                    sn,
                    state: SlotState::Chunk,
                    copyset: copyset.0,
                    ..SlotMeta::FREE
                })
                .await?
            }
        };
        let len = data.len() as u64;
        self.bdev
            .write(self.layout.slot_offset(slot) + offset, data)
            .await?;
        self.mark_clone_pages_written(slot, offset, len);
        self.record_applied(chunk, index);
        Ok(())
    }

    /// [`ShardEngine::write_chunk`] of a payload as raft carries it: an aligned `Bytes` (one
    /// received into a DMA buffer) is written without a copy.
    pub async fn write_chunk_bytes(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u64,
        data: Bytes,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.check_request(offset, data.len() as u64)?;
        let buffer = self.bdev.pool().from_bytes_or_copy(data)?;
        self.write_chunk_in(copyset, chunk, offset, buffer, sn, index)
            .await
    }

    pub(super) fn slot_meta(&self, slot: u32) -> Result<SlotMeta, StorageError> {
        self.table
            .borrow()
            .slot(slot)
            .copied()
            .ok_or_else(|| StorageError::Geometry(format!("slot {slot} out of the table")))
    }

    /// Reads `len` bytes at `offset` of `chunk`.
    pub async fn read_chunk(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> Result<DmaBuf, StorageError> {
        self.check_request(offset, len)?;
        let slot = self
            .table
            .borrow()
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let mut data = self
            .bdev
            .read_new(self.layout.slot_offset(slot) + offset, len as usize)
            .await?;
        let missing = self.clone_pages_missing(slot, offset, len);
        if missing.is_empty() {
            return Ok(data);
        }
        // A clone's unwritten pages read through to its source.
        let source = self.clone_sources.borrow().get(&slot).copied();
        let source_slot = source
            .and_then(|s| self.table.borrow().lookup(s))
            .ok_or_else(|| StorageError::Conflict {
                chunk,
                reason: "the clone's source chunk no longer exists".into(),
            })?;
        self.overlay_pages(&mut data, offset, source_slot, missing)
            .await?;
        Ok(data)
    }

    /// Copies `pages` (page numbers of the chunk) from `slot` into `data`, which holds the
    /// chunk's bytes from `offset` on: what a read takes from a clone's source or from a
    /// snapshot's preserved pages.
    pub(super) async fn overlay_pages(
        &self,
        data: &mut DmaBuf,
        offset: u64,
        slot: u32,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<(), StorageError> {
        let page = u64::from(self.layout.geometry.page_size);
        for p in pages {
            let from = self
                .bdev
                .read(
                    self.layout.slot_offset(slot) + p * page,
                    self.bdev.alloc(page as usize)?,
                )
                .await?;
            let at = (p * page - offset) as usize;
            if let Some(target) = data
                .as_mut_slice()
                .and_then(|d| d.get_mut(at..at + page as usize))
            {
                target.copy_from_slice(from.as_slice());
            }
        }
        Ok(())
    }

    /// Deletes `chunk` (and its snapshot), as the entry at `index`: its slots are zeroed and
    /// return to the pool. Deleting a chunk that does not exist succeeds, so applying twice is
    /// harmless.
    pub async fn delete_chunk(&self, chunk: ChunkId, index: LogIndex) -> Result<(), StorageError> {
        let Some(slot) = self.table.borrow().lookup(chunk) else {
            return Ok(());
        };
        if self.already_applied(slot, index)? {
            return Ok(());
        }
        self.check_not_a_clone_source(chunk)?;
        let meta = self.slot_meta(slot)?;
        let mut slots = vec![slot];
        if meta.link != NO_SLOT {
            slots.push(meta.link);
        }
        for slot in &slots {
            self.table.borrow_mut().release(*slot);
            self.bitmaps.borrow_mut().remove(slot);
            if self.clone_sources.borrow_mut().remove(slot).is_some() {
                self.clone_epoch.set(self.clone_epoch.get() + 1);
            }
        }
        for slot in &slots {
            self.bdev
                .write_zeroes(
                    self.layout.slot_offset(*slot),
                    self.layout.geometry.chunk_size,
                )
                .await?;
            self.table.borrow_mut().release_done(*slot);
        }
        Ok(())
    }

    /// A chunk's size and sequence numbers.
    pub fn chunk_info(&self, chunk: ChunkId) -> Result<ChunkInfo, StorageError> {
        let table = self.table.borrow();
        let slot = table
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let meta = table
            .slot(slot)
            .copied()
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let snapshot_sn = if meta.link == NO_SLOT {
            None
        } else {
            table.slot(meta.link).map(|m| m.sn)
        };
        Ok(ChunkInfo {
            size: self.layout.geometry.chunk_size,
            sn: meta.sn,
            snapshot_sn,
            corrected_sn: meta.aux,
            clone_source: self.clone_sources.borrow().get(&slot).copied(),
        })
    }

    /// Deletes `copyset` from the shard: a durable WAL record first (a restart no longer
    /// brings the copyset back; the next checkpoint frees its page), then its chunks. A crash
    /// between the two leaves chunks of a copyset that no longer exists, which
    /// [`remove_orphan_chunks`](Self::remove_orphan_chunks) deletes at the next start.
    pub async fn remove_copyset(&self, copyset: CopysetId) -> Result<(), StorageError> {
        let lsn = self.wal.remove_copyset(copyset)?;
        self.wal.sync(lsn).await?;
        for chunk in self.chunks_of(copyset) {
            self.delete_chunk(chunk, LogIndex(0)).await?;
        }
        Ok(())
    }

    /// Deletes the chunks whose copyset is not on the shard (left by a deletion that a crash
    /// interrupted). Returns how many went.
    pub async fn remove_orphan_chunks(&self) -> Result<usize, StorageError> {
        // Images an install staged when a crash cut it short: the chunks they were to
        // replace kept their bytes.
        let staged = self.remove_staged_images(None).await?;
        let copysets: BTreeSet<u64> = self.wal.copysets().iter().map(|c| c.0).collect();
        let orphans: Vec<ChunkId> = {
            let table = self.table.borrow();
            table
                .chunks()
                .filter(|(_, slot)| {
                    table.slot(*slot).is_some_and(|m| {
                        m.state == SlotState::Chunk
                            && m.copyset != 0
                            && !copysets.contains(&m.copyset)
                    })
                })
                .map(|(chunk, _)| chunk)
                .collect()
        };
        for chunk in &orphans {
            self.delete_chunk(*chunk, LogIndex(0)).await?;
        }
        Ok(staged + orphans.len())
    }

    /// Every chunk in the table.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.table.borrow().chunks().map(|(c, _)| c).collect();
        ids.sort();
        ids
    }
}
