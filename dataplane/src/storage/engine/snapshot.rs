//! Copy-on-write snapshots of chunks by sequence number (Curve's snapshot semantics).

use raftcore::LogIndex;

use super::ShardEngine;
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::table::{ChunkId, SlotMeta, SlotState, FLAG_CLONE, NO_SLOT};
use crate::storage::StorageError;

impl<B: Bdev> ShardEngine<B> {
    /// Prepares `chunk` (in `slot`) for a write of `len` bytes at `offset` with sequence
    /// number `sn`: a newer sn than the chunk's (and than its corrected sn) first turns the
    /// current version into a snapshot; while a snapshot exists, the pages the write covers
    /// that the snapshot does not hold yet are copied into it, and a checkpoint makes the
    /// copies and the page bitmap durable before the write may overwrite them. Replaying the
    /// write after a crash then finds them preserved and copies nothing twice.
    pub(super) async fn preserve_for_snapshot(
        &self,
        chunk: ChunkId,
        slot: u32,
        offset: u64,
        len: u64,
        sn: u64,
    ) -> Result<(), StorageError> {
        let mut meta = self.slot_meta(slot)?;
        if sn > meta.sn {
            if sn <= meta.aux {
                // The corrected sn says no snapshot was taken at this sn.
                meta.sn = sn;
                self.table.borrow_mut().update(slot, meta);
                return Ok(());
            }
            meta = self.take_snapshot(chunk, slot, meta, sn).await?;
        }
        if meta.link == NO_SLOT {
            return Ok(());
        }
        let snapshot = meta.link;
        let missing = self.pages_not_preserved(snapshot, offset, len);
        if missing.is_empty() {
            return Ok(());
        }
        self.copy_pages_to_snapshot(slot, snapshot, &missing)
            .await?;
        self.mark_preserved(snapshot, &missing);
        self.dirty_bitmaps.borrow_mut().insert(snapshot);
        let (marked, durable) = self.preserved.get();
        self.preserved.set((marked + 1, durable));
        self.checkpoint_covering(Some(marked + 1)).await
    }

    /// Turns the current version of `chunk` (in `slot`, with metadata `meta`) into a snapshot
    /// for a write with the newer sequence number `sn`: a fresh slot with an empty page bitmap
    /// becomes the snapshot, and the chunk takes `sn`. Refused while the chunk still has a
    /// snapshot. Returns the chunk's metadata after.
    async fn take_snapshot(
        &self,
        chunk: ChunkId,
        slot: u32,
        mut meta: SlotMeta,
        sn: u64,
    ) -> Result<SlotMeta, StorageError> {
        if meta.link != NO_SLOT {
            let snapshot_sn = self.slot_meta(meta.link)?.sn;
            return Err(StorageError::Conflict {
                chunk,
                reason: format!(
                    "a write with sn {sn} needs a new snapshot but the chunk still has the \
                     one at sn {snapshot_sn}; delete it first"
                ),
            });
        }
        let snapshot = self
            .allocate(SlotMeta {
                chunk,
                sn: meta.sn,
                link: slot,
                state: SlotState::Snapshot,
                copyset: meta.copyset,
                ..SlotMeta::FREE
            })
            .await?;
        let words = self.layout.geometry.pages_per_chunk().div_ceil(64) as usize;
        let current = self
            .bitmap_copies
            .borrow()
            .get(&snapshot)
            .copied()
            .unwrap_or(1);
        self.bitmaps
            .borrow_mut()
            .insert(snapshot, (vec![0; words], current));
        self.dirty_bitmaps.borrow_mut().insert(snapshot);
        meta = self.slot_meta(slot)?;
        meta.link = snapshot;
        meta.sn = sn;
        self.table.borrow_mut().update(slot, meta);
        Ok(meta)
    }

    /// The pages of the range `offset..offset + len` that `snapshot`'s page bitmap does not
    /// mark as preserved, in order.
    fn pages_not_preserved(&self, snapshot: u32, offset: u64, len: u64) -> Vec<usize> {
        let page = u64::from(self.layout.geometry.page_size);
        let first = (offset / page) as usize;
        let last = ((offset + len) / page) as usize;
        let bitmaps = self.bitmaps.borrow();
        let bitmap = bitmaps
            .get(&snapshot)
            .map(|(b, _)| b.as_slice())
            .unwrap_or(&[]);
        (first..last)
            .filter(|p| {
                bitmap
                    .get(p / 64)
                    .map_or(true, |w| w & (1 << (p % 64)) == 0)
            })
            .collect()
    }

    /// Copies the chunk's `missing` pages (in `slot`) into `snapshot`'s slot, a run of
    /// consecutive pages at a time.
    async fn copy_pages_to_snapshot(
        &self,
        slot: u32,
        snapshot: u32,
        missing: &[usize],
    ) -> Result<(), StorageError> {
        let page = u64::from(self.layout.geometry.page_size);
        let mut run_start = 0;
        while run_start < missing.len() {
            let mut run_end = run_start + 1;
            while run_end < missing.len() && missing[run_end] == missing[run_end - 1] + 1 {
                run_end += 1;
            }
            let from = missing[run_start] as u64 * page;
            let bytes = (run_end - run_start) as u64 * page;
            let buffer = self.bdev.alloc(bytes as usize)?;
            let old = self
                .bdev
                .read(self.layout.slot_offset(slot) + from, buffer)
                .await?;
            self.bdev
                .write(self.layout.slot_offset(snapshot) + from, old)
                .await?;
            run_start = run_end;
        }
        Ok(())
    }

    /// Marks the `missing` pages as preserved in `snapshot`'s page bitmap.
    fn mark_preserved(&self, snapshot: u32, missing: &[usize]) {
        if let Some((bitmap, _)) = self.bitmaps.borrow_mut().get_mut(&snapshot) {
            for p in missing {
                if let Some(word) = bitmap.get_mut(p / 64) {
                    *word |= 1 << (p % 64);
                }
            }
        }
    }

    /// The slot of `chunk` for the entry at `index` to change; `None` when the chunk does not
    /// exist or has applied that entry already (a replay): nothing to do.
    fn slot_to_apply(&self, chunk: ChunkId, index: LogIndex) -> Result<Option<u32>, StorageError> {
        let Some(slot) = self.table.borrow().lookup(chunk) else {
            return Ok(None);
        };
        if self.already_applied(slot, index)? {
            return Ok(None);
        }
        Ok(Some(slot))
    }

    /// Raises `chunk`'s sequence number to `sn` without writing, as the entry at `index`: its
    /// current version becomes its snapshot (as a write with `sn` would make it), so a write
    /// of an older sequence number is refused from now on. A chunk that does not exist stays
    /// so, one at `sn` or newer is unchanged, and a lazy clone is refused like a write.
    pub async fn fence_chunk(
        &self,
        chunk: ChunkId,
        sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        let Some(slot) = self.slot_to_apply(chunk, index)? else {
            return Ok(());
        };
        let meta = self.slot_meta(slot)?;
        if sn > meta.sn {
            if meta.flags & FLAG_CLONE != 0 && sn > meta.aux {
                return Err(StorageError::Conflict {
                    chunk,
                    reason: format!(
                        "a fence at sn {sn} would snapshot a lazy clone; flatten it first"
                    ),
                });
            }
            self.preserve_for_snapshot(chunk, slot, 0, 0, sn).await?;
        }
        self.record_applied(chunk, index);
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the version of `chunk` with sequence number `sn`:
    /// its snapshot's pages where the snapshot holds them, the chunk's elsewhere.
    pub async fn read_snapshot(
        &self,
        chunk: ChunkId,
        sn: u64,
        offset: u64,
        len: u64,
    ) -> Result<DmaBuf, StorageError> {
        self.check_request(offset, len)?;
        let slot = self
            .table
            .borrow()
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let meta = self.slot_meta(slot)?;
        let snapshot = if meta.link != NO_SLOT && self.slot_meta(meta.link)?.sn == sn {
            meta.link
        } else if meta.sn == sn {
            return self.read_chunk(chunk, offset, len).await;
        } else {
            return Err(StorageError::SnapshotNotFound { chunk, sn });
        };
        let mut data = self
            .bdev
            .read(
                self.layout.slot_offset(slot) + offset,
                self.bdev.alloc(len as usize)?,
            )
            .await?;
        let page = u64::from(self.layout.geometry.page_size);
        let preserved: Vec<u64> = {
            let bitmaps = self.bitmaps.borrow();
            let bitmap = bitmaps
                .get(&snapshot)
                .map(|(b, _)| b.as_slice())
                .unwrap_or(&[]);
            (offset / page..(offset + len) / page)
                .filter(|p| {
                    bitmap
                        .get((p / 64) as usize)
                        .is_some_and(|w| w & (1 << (p % 64)) != 0)
                })
                .collect()
        };
        self.overlay_pages(&mut data, offset, snapshot, preserved)
            .await?;
        Ok(data)
    }

    /// Curve's DeleteSnapshotChunkOrCorrectSn: deletes the chunk's snapshot if it has one,
    /// and raises its corrected sn to `corrected_sn` (so a later write with that sn makes no
    /// new snapshot). A chunk that does not exist is not an error: applying twice is harmless.
    pub async fn delete_snapshot_or_correct_sn(
        &self,
        chunk: ChunkId,
        corrected_sn: u64,
        index: LogIndex,
    ) -> Result<(), StorageError> {
        let Some(slot) = self.slot_to_apply(chunk, index)? else {
            return Ok(());
        };
        let mut meta = self.slot_meta(slot)?;
        let snapshot = meta.link;
        meta.link = NO_SLOT;
        if corrected_sn > meta.sn {
            meta.aux = meta.aux.max(corrected_sn);
        }
        self.table.borrow_mut().update(slot, meta);
        if snapshot != NO_SLOT {
            self.table.borrow_mut().release(snapshot);
            self.bitmaps.borrow_mut().remove(&snapshot);
            self.bdev
                .write_zeroes(
                    self.layout.slot_offset(snapshot),
                    self.layout.geometry.chunk_size,
                )
                .await?;
            self.table.borrow_mut().release_done(snapshot);
        }
        self.record_applied(chunk, index);
        Ok(())
    }
}
