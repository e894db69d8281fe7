//! Lazy clones: chunks whose unwritten pages read through to a source chunk.

use raftcore::LogIndex;

use super::ShardEngine;
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::table::{ChunkId, SlotMeta, SlotState, FLAG_CLONE};
use crate::storage::wal::record::CopysetId;
use crate::storage::StorageError;

impl<B: Bdev> ShardEngine<B> {
    /// How many times clone relationships changed on this shard (see `clone_epoch`).
    pub fn clone_epoch(&self) -> u64 {
        self.clone_epoch.get()
    }

    /// Refuses to change a chunk that lazy clones read through to: a clone's source is
    /// read-only while clones of it exist, so that re-applying a clone's recover or flatten
    /// after a crash reads what it read the first time.
    pub(super) fn check_not_a_clone_source(&self, chunk: ChunkId) -> Result<(), StorageError> {
        if self
            .clone_sources
            .borrow()
            .values()
            .any(|source| *source == chunk)
        {
            return Err(StorageError::Conflict {
                chunk,
                reason: "lazy clones read through to it; it is read-only until they are \
                         flattened or deleted"
                    .into(),
            });
        }
        Ok(())
    }

    /// Marks pages of a clone as its own from now on (no effect on other chunks).
    pub(super) fn mark_clone_pages_written(&self, slot: u32, offset: u64, len: u64) {
        if !self.clone_sources.borrow().contains_key(&slot) {
            return;
        }
        let page = u64::from(self.layout.geometry.page_size);
        if let Some((bitmap, _)) = self.bitmaps.borrow_mut().get_mut(&slot) {
            for p in offset / page..(offset + len) / page {
                if let Some(word) = bitmap.get_mut((p / 64) as usize) {
                    *word |= 1 << (p % 64);
                }
            }
        }
        self.dirty_bitmaps.borrow_mut().insert(slot);
    }

    /// Pages of `[offset, offset + len)` a clone in `slot` has not written yet (empty for a
    /// chunk that is not a clone).
    pub(super) fn clone_pages_missing(&self, slot: u32, offset: u64, len: u64) -> Vec<u64> {
        if !self.clone_sources.borrow().contains_key(&slot) {
            return Vec::new();
        }
        let page = u64::from(self.layout.geometry.page_size);
        let bitmaps = self.bitmaps.borrow();
        let bitmap = bitmaps.get(&slot).map(|(b, _)| b.as_slice()).unwrap_or(&[]);
        (offset / page..(offset + len) / page)
            .filter(|p| {
                bitmap
                    .get((p / 64) as usize)
                    .map_or(true, |w| w & (1 << (p % 64)) == 0)
            })
            .collect()
    }

    /// Creates `chunk` as a lazy clone of `source` (a chunk of this shard that is not itself
    /// a clone): it reads as the source until its pages are written, pasted or recovered.
    /// Creating the same clone again is harmless; a chunk that exists otherwise is a conflict.
    pub async fn create_clone_chunk(
        &self,
        chunk: ChunkId,
        source: ChunkId,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.create_clone_chunk_in(CopysetId(0), chunk, source, sn, index)
            .await
    }

    /// [`create_clone_chunk`](Self::create_clone_chunk) for `copyset`'s log: the clone is
    /// recorded as that copyset's.
    pub async fn create_clone_chunk_in(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        source: ChunkId,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        let existing = self.table.borrow().lookup(chunk);
        if let Some(slot) = existing {
            if self.already_applied(slot, index)?
                || self.clone_sources.borrow().get(&slot) == Some(&source)
            {
                return Ok(());
            }
            return Err(StorageError::Conflict {
                chunk,
                reason: format!("exists already; it cannot become a clone of {source}"),
            });
        }
        let source_slot = self
            .table
            .borrow()
            .lookup(source)
            .ok_or(StorageError::ChunkNotFound(source))?;
        if self.clone_sources.borrow().contains_key(&source_slot) {
            return Err(StorageError::Conflict {
                chunk,
                reason: format!("its source {source} is itself a lazy clone"),
            });
        }
        let slot = self
            .allocate(SlotMeta {
                chunk,
                sn,
                flags: FLAG_CLONE,
                state: SlotState::Chunk,
                copyset: copyset.0,
                ..SlotMeta::FREE
            })
            .await?;
        let words = self.layout.geometry.pages_per_chunk().div_ceil(64) as usize;
        let current = self.bitmap_copies.borrow().get(&slot).copied().unwrap_or(1);
        self.bitmaps
            .borrow_mut()
            .insert(slot, (vec![0; words], current));
        self.clone_sources.borrow_mut().insert(slot, source);
        self.clone_epoch.set(self.clone_epoch.get() + 1);
        self.dirty_bitmaps.borrow_mut().insert(slot);
        self.record_applied(chunk, index);
        Ok(())
    }

    /// Curve's PasteChunk: writes the pages of `data` (at `offset`) that the clone has not
    /// written yet, leaving its own pages alone. A chunk that is not a clone is left as is.
    pub async fn paste_chunk(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: DmaBuf,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.check_request(offset, data.len() as u64)?;
        let slot = self
            .table
            .borrow()
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        if self.already_applied(slot, index)? {
            return Ok(());
        }
        let page = u64::from(self.layout.geometry.page_size);
        for p in self.clone_pages_missing(slot, offset, data.len() as u64) {
            let at = (p * page - offset) as usize;
            let mut piece = self.bdev.alloc(page as usize)?;
            if let (Some(target), Some(source)) = (
                piece.as_mut_slice(),
                data.as_slice().get(at..at + page as usize),
            ) {
                target.copy_from_slice(source);
            }
            self.bdev
                .write(self.layout.slot_offset(slot) + p * page, piece)
                .await?;
            self.mark_clone_pages_written(slot, p * page, page);
        }
        self.record_applied(chunk, index);
        Ok(())
    }

    /// Copies a clone's unwritten pages of a range from its source; returns whether any
    /// page was copied.
    pub(super) async fn fill_from_source(
        &self,
        slot: u32,
        offset: u64,
        len: u64,
    ) -> Result<bool, StorageError> {
        let Some(source) = self.clone_sources.borrow().get(&slot).copied() else {
            return Ok(false);
        };
        let missing = self.clone_pages_missing(slot, offset, len);
        if missing.is_empty() {
            return Ok(false);
        }
        let source_data = self.read_chunk(source, offset, len).await?;
        let page = u64::from(self.layout.geometry.page_size);
        for p in missing {
            let at = (p * page - offset) as usize;
            let mut piece = self.bdev.alloc(page as usize)?;
            if let (Some(target), Some(from)) = (
                piece.as_mut_slice(),
                source_data.as_slice().get(at..at + page as usize),
            ) {
                target.copy_from_slice(from);
            }
            self.bdev
                .write(self.layout.slot_offset(slot) + p * page, piece)
                .await?;
            self.mark_clone_pages_written(slot, p * page, page);
        }
        Ok(true)
    }

    /// Curve's RecoverChunk: fills the clone's unwritten pages of a range from its source.
    /// A checkpoint makes the result durable before this returns, so that replaying the
    /// entry after a crash never reads a source that changed since.
    pub async fn recover_chunk(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        self.check_request(offset, len)?;
        let slot = self
            .table
            .borrow()
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        if self.already_applied(slot, index)? {
            return Ok(());
        }
        let copied = self.fill_from_source(slot, offset, len).await?;
        self.record_applied(chunk, index);
        if copied {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Makes a clone an ordinary chunk: its unwritten pages are filled from the source, then
    /// it stops reading through. Durable (by a checkpoint) before it returns, as
    /// [`ShardEngine::recover_chunk`] is.
    pub async fn flatten_chunk(&self, chunk: ChunkId, index: LogIndex) -> Result<(), StorageError> {
        let slot = self
            .table
            .borrow()
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        if self.already_applied(slot, index)? || !self.clone_sources.borrow().contains_key(&slot) {
            return Ok(());
        }
        let chunk_size = self.layout.geometry.chunk_size;
        self.fill_from_source(slot, 0, chunk_size).await?;
        let mut meta = self.slot_meta(slot)?;
        meta.flags &= !FLAG_CLONE;
        self.table.borrow_mut().update(slot, meta);
        self.clone_sources.borrow_mut().remove(&slot);
        self.clone_epoch.set(self.clone_epoch.get() + 1);
        self.bitmaps.borrow_mut().remove(&slot);
        self.record_applied(chunk, index);
        self.checkpoint().await
    }
}
