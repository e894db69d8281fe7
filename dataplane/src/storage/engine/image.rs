//! Copyset images: how a replica that fell behind the leader's log compaction gets the chunks
//! instead of the entries it missed (the chunks are the copyset's raft snapshot).
//!
//! The source keeps writing while an image is copied, so the copy is *fuzzy*, as ZooKeeper's
//! snapshots are: each chunk travels in pieces read at different moments. That is sound here
//! because of three facts the engine already keeps:
//!
//! - a chunk records the log index of the last entry applied to it, and an entry at or below
//!   it changes nothing when applied again;
//! - the receiver records, for each copied chunk, the index the source reported *before* its
//!   first piece was read, so every piece holds at least that state;
//! - the entries after it that touch the chunk are whole-page writes, deletes and sequence-
//!   number changes; the receiver applies them again in log order, and writes and deletes set
//!   what they touch regardless of what was there.
//!
//! Only an operation whose outcome depends on the chunk's earlier content — a write that
//! opens a copy-on-write snapshot, a snapshot's deletion, a corrected sn — could make a fuzzy
//! copy wrong; such operations change the chunk's sequence numbers, every piece carries them,
//! and a change between pieces makes the receiver start that chunk again. A chunk with a
//! snapshot travels as two parts, the snapshot's version first, then the current one, which
//! the receiver writes with the newer sn so that the engine's own copy-on-write rebuilds the
//! snapshot. A lazy clone travels as a clone of the same source (listed after the plain
//! chunks, so its source is there first) with every page written: its unwritten pages read
//! through to the source, which is read-only while clones of it exist, so the content is the
//! same either way; flattening changes its versions.

use std::collections::BTreeSet;

use bytes::Bytes;
use raftcore::LogIndex;

use super::ShardEngine;
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::table::{ChunkId, SlotState, FLAG_CLONE, NO_SLOT};
use crate::storage::wal::record::CopysetId;
use crate::storage::StorageError;

/// Which version of a chunk an image piece holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePart {
    /// The chunk's current data.
    Current,
    /// The data of its copy-on-write snapshot.
    Snapshot,
}

/// A chunk's metadata, as an image carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkImageMeta {
    /// The chunk's sequence number.
    pub sn: u64,
    /// Curve's corrected sn.
    pub corrected_sn: u64,
    /// The snapshot's sequence number, when the chunk has one.
    pub snapshot_sn: Option<u64>,
    /// The log index of the last entry applied to the chunk (0: none recorded).
    pub applied: u64,
    /// For a lazy clone, the chunk it reads through to.
    pub clone_source: Option<ChunkId>,
}

impl ChunkImageMeta {
    /// Whether `other` has the same versions (sequence numbers and snapshot): pieces read
    /// under both belong to one copy.
    pub fn same_versions(&self, other: &ChunkImageMeta) -> bool {
        self.sn == other.sn
            && self.corrected_sn == other.corrected_sn
            && self.snapshot_sn == other.snapshot_sn
            && self.clone_source == other.clone_source
    }
}

/// One piece of a chunk's image.
#[derive(Debug)]
pub struct ImagePiece {
    /// The chunk's metadata, read before the data.
    pub meta: ChunkImageMeta,
    /// The bytes; `None` when the piece is all zeroes or was asked with length 0.
    pub data: Option<DmaBuf>,
}

impl<B: Bdev> ShardEngine<B> {
    /// The chunks that `copyset`'s log wrote: plain chunks in id order, then lazy clones in id
    /// order (so that a copy in this order makes each clone's source first).
    pub fn chunks_of(&self, copyset: CopysetId) -> Vec<ChunkId> {
        let table = self.table.borrow();
        let mut ids: Vec<(bool, ChunkId)> = table
            .chunks()
            .filter_map(|(chunk, slot)| {
                let meta = table.slot(slot)?;
                (meta.state == SlotState::Chunk && meta.copyset == copyset.0 && !is_staging(chunk))
                    .then_some((meta.flags & FLAG_CLONE != 0, chunk))
            })
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, chunk)| chunk).collect()
    }

    /// Refuses an operation of `copyset` on a chunk that another copyset's log wrote (chunk
    /// ids are shard-wide; two copysets must not share one).
    pub fn check_owner(&self, chunk: ChunkId, copyset: CopysetId) -> Result<(), StorageError> {
        let table = self.table.borrow();
        let Some(meta) = table.lookup(chunk).and_then(|slot| table.slot(slot)) else {
            return Ok(());
        };
        if copyset.0 != 0 && meta.copyset != 0 && meta.copyset != copyset.0 {
            return Err(StorageError::Conflict {
                chunk,
                reason: format!(
                    "the chunk belongs to copyset {}, not {}",
                    meta.copyset, copyset.0
                ),
            });
        }
        Ok(())
    }

    /// The metadata an image of `chunk` carries.
    pub fn chunk_image_meta(&self, chunk: ChunkId) -> Result<ChunkImageMeta, StorageError> {
        let table = self.table.borrow();
        let meta = table
            .lookup(chunk)
            .and_then(|slot| table.slot(slot))
            .copied()
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let clone_source = if meta.flags & FLAG_CLONE != 0 {
            let slot = table
                .lookup(chunk)
                .ok_or(StorageError::ChunkNotFound(chunk))?;
            self.clone_sources.borrow().get(&slot).copied()
        } else {
            None
        };
        let snapshot_sn = if meta.link == NO_SLOT {
            None
        } else {
            table.slot(meta.link).map(|m| m.sn)
        };
        Ok(ChunkImageMeta {
            sn: meta.sn,
            corrected_sn: meta.aux,
            snapshot_sn,
            applied: meta.applied,
            clone_source,
        })
    }

    /// Reads one piece of `chunk`'s image: its metadata, then `len` bytes at `offset` of the
    /// `part` asked for (no bytes when `len` is 0).
    pub async fn read_image_piece(
        &self,
        chunk: ChunkId,
        part: ImagePart,
        offset: u64,
        len: u64,
    ) -> Result<ImagePiece, StorageError> {
        let meta = self.chunk_image_meta(chunk)?;
        if len == 0 {
            return Ok(ImagePiece { meta, data: None });
        }
        let data = match part {
            ImagePart::Current => self.read_chunk(chunk, offset, len).await?,
            ImagePart::Snapshot => {
                // Gone since the copy began: the versions say so, and the copy starts over.
                let Some(sn) = meta.snapshot_sn else {
                    return Ok(ImagePiece { meta, data: None });
                };
                self.read_snapshot(chunk, sn, offset, len).await?
            }
        };
        let zero = data.as_slice().iter().all(|b| *b == 0);
        Ok(ImagePiece {
            meta,
            data: (!zero).then_some(data),
        })
    }

    /// A fresh id to stage a chunk's image under (see [`is_staging`]).
    fn staging_id(&self) -> ChunkId {
        let n = self.staging.get();
        self.staging.set(n.wrapping_add(1));
        ChunkId(STAGING_BASE + n % STAGING_IDS)
    }

    /// Deletes the staged images of `copyset` (an install of it cut short), or of every
    /// copyset (`None`: at a shard's start, what a crash left), with the chunks swaps
    /// retired. Installs of other copysets may be staging images at the same time: theirs
    /// stay; so do retired chunks no checkpoint has recorded as retired yet.
    pub async fn remove_staged_images(
        &self,
        copyset: Option<CopysetId>,
    ) -> Result<usize, StorageError> {
        let staged: Vec<ChunkId> = {
            let table = self.table.borrow();
            table
                .chunks()
                .filter(|(chunk, slot)| {
                    is_staging(*chunk)
                        && !self.retired_pending(*chunk)
                        && copyset.map_or(true, |c| {
                            table.slot(*slot).is_some_and(|meta| meta.copyset == c.0)
                        })
                })
                .map(|(chunk, _)| chunk)
                .collect()
        };
        for chunk in &staged {
            self.delete_chunk(*chunk, LogIndex(0)).await?;
        }
        Ok(staged.len())
    }

    /// Puts a complete staged image in place of `chunk`, in one step without I/O (no
    /// checkpoint can see the chunk missing). What it replaced is retired under a staging id
    /// and left whole until a checkpoint records the swap: until then the committed table
    /// still maps `chunk` to the retired slot, and a crash brings that mapping back — the
    /// slot must then hold the chunk's old bytes, not zeroes or another chunk's image (the
    /// pool hands out the lowest free slot, so the next chunk's image would land there).
    /// The checkpoint deletes retired chunks once it committed; a swap runs one when
    /// [`RETIRED_MAX`] wait, which bounds the slots they hold.
    async fn swap_in_staged(&self, staging: ChunkId, chunk: ChunkId) -> Result<(), StorageError> {
        {
            let mut table = self.table.borrow_mut();
            if table.lookup(chunk).is_some() {
                let retired = self.staging_id();
                table.rename(chunk, retired)?;
                self.retired.borrow_mut().push(retired);
            }
            table.rename(staging, chunk)?;
        }
        if self.retired.borrow().len() >= RETIRED_MAX {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Deletes the retired chunks whose retirement a checkpoint committed.
    pub(super) async fn delete_retired(&self) -> Result<(), StorageError> {
        loop {
            let next = self.retired_durable.borrow_mut().pop();
            let Some(chunk) = next else {
                return Ok(());
            };
            if let Err(error) = self.delete_chunk(chunk, LogIndex(0)).await {
                // Still a staging id: the next try (or the shard's next start) deletes it.
                self.retired_durable.borrow_mut().push(chunk);
                return Err(error);
            }
        }
    }

    /// Whether `chunk` is a retired chunk that no checkpoint has recorded as such yet.
    fn retired_pending(&self, chunk: ChunkId) -> bool {
        self.retired.borrow().contains(&chunk)
    }

    /// Writes one piece of a chunk's image: the snapshot part with the snapshot's sn first,
    /// then the current part with the chunk's sn (which rebuilds the snapshot by copy-on-write).
    pub async fn write_image_piece(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        sn: u64,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        self.write_chunk_bytes(copyset, chunk, offset, data, sn, LogIndex(0))
            .await
    }

    /// Finishes copying `chunk`: its corrected sn and the applied index the source reported
    /// before the first piece, so that entries at or below it are not applied again.
    pub fn finish_chunk_image(
        &self,
        chunk: ChunkId,
        meta: &ChunkImageMeta,
    ) -> Result<(), StorageError> {
        let mut table = self.table.borrow_mut();
        let slot = table
            .lookup(chunk)
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        let mut slot_meta = table
            .slot(slot)
            .copied()
            .ok_or(StorageError::ChunkNotFound(chunk))?;
        slot_meta.aux = meta.corrected_sn;
        slot_meta.applied = meta.applied;
        table.update(slot, slot_meta);
        Ok(())
    }

    /// Copies one chunk of `copyset`'s image into this shard; `fetch(part, offset, len)`
    /// reads a piece at the source (`len` 0: metadata only) and answers `None` once the chunk
    /// is gone there. Starts the chunk over when its versions change between pieces (at most
    /// `restarts_max` times). Returns the bytes that travelled.
    pub async fn copy_chunk_image<F>(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        chunk_size: u64,
        piece_bytes: u64,
        restarts_max: u32,
        mut fetch: F,
    ) -> Result<u64, String>
    where
        F: AsyncFnMut(ImagePart, u64, u64) -> Result<Option<(ChunkImageMeta, Bytes)>, String>,
    {
        for _ in 0..restarts_max {
            let attempt = self
                .copy_image_attempt(copyset, chunk, chunk_size, piece_bytes, &mut fetch)
                .await?;
            if let Some(bytes) = attempt {
                return Ok(bytes);
            }
        }
        Err(format!(
            "chunk {chunk} changed versions {restarts_max} times during its copy"
        ))
    }

    /// One attempt at copying `chunk` (see [`copy_chunk_image`](Self::copy_chunk_image)):
    /// the bytes that travelled, or `None` when the chunk's versions changed between pieces
    /// and the copy must start over (its staged image is deleted then).
    async fn copy_image_attempt<F>(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        chunk_size: u64,
        piece_bytes: u64,
        fetch: &mut F,
    ) -> Result<Option<u64>, String>
    where
        F: AsyncFnMut(ImagePart, u64, u64) -> Result<Option<(ChunkImageMeta, Bytes)>, String>,
    {
        let local = |e: StorageError| e.to_string();
        // The image is staged under an id of its own and takes the chunk's place only
        // once it is whole: until then the chunk keeps its old bytes, which the log above
        // this replica's applied index brings up to date — also after a crash, when
        // re-applying the log is all that happens (a deleted chunk would stay lost).
        let staging = self.staging_id();
        // The versions and the applied index, before any byte is read.
        let Some((first, _)) = fetch(ImagePart::Current, 0, 0).await? else {
            // Deleted at the source since the list, by an entry above this replica's
            // applied index: re-applying the log deletes it too.
            self.delete_chunk(chunk, LogIndex(0)).await.map_err(local)?;
            return Ok(Some(0));
        };
        if self.holds_image_of(chunk, &first) {
            return Ok(Some(0));
        }
        if let Some(source) = first.clone_source {
            self.create_clone_chunk_in(copyset, staging, source, first.sn, LogIndex(0))
                .await
                .map_err(local)?;
        }
        let copy = ImageCopy {
            copyset,
            chunk,
            staging,
            first,
            chunk_size,
            piece_bytes,
        };
        let mut bytes = 0;
        let mut parts = Vec::new();
        if let Some(snapshot_sn) = first.snapshot_sn {
            parts.push((ImagePart::Snapshot, snapshot_sn));
        }
        parts.push((ImagePart::Current, first.sn));
        for (part, sn) in parts {
            match self
                .copy_image_part(&copy, part, sn, fetch, &mut bytes)
                .await?
            {
                PartCopy::Whole => {}
                PartCopy::Gone => {
                    self.delete_chunk(staging, LogIndex(0))
                        .await
                        .map_err(local)?;
                    self.delete_chunk(chunk, LogIndex(0)).await.map_err(local)?;
                    return Ok(Some(bytes));
                }
                PartCopy::VersionsChanged => {
                    self.delete_chunk(staging, LogIndex(0))
                        .await
                        .map_err(local)?;
                    return Ok(None);
                }
            }
        }
        self.finish_chunk_image(staging, &first).map_err(local)?;
        self.swap_in_staged(staging, chunk).await.map_err(local)?;
        Ok(Some(bytes))
    }

    /// Copies the `part` of a chunk's image (with sequence number `sn`) piece by piece into
    /// its staged chunk, adding the bytes that travelled to `bytes`. Stops at the first piece
    /// that finds the chunk gone at the source or its versions changed, and says which; the
    /// caller cleans up.
    async fn copy_image_part<F>(
        &self,
        copy: &ImageCopy,
        part: ImagePart,
        sn: u64,
        fetch: &mut F,
        bytes: &mut u64,
    ) -> Result<PartCopy, String>
    where
        F: AsyncFnMut(ImagePart, u64, u64) -> Result<Option<(ChunkImageMeta, Bytes)>, String>,
    {
        let local = |e: StorageError| e.to_string();
        let (chunk, first) = (copy.chunk, &copy.first);
        let mut offset = 0;
        while offset < copy.chunk_size {
            let len = copy.piece_bytes.min(copy.chunk_size - offset);
            let Some((meta, data)) = fetch(part, offset, len).await? else {
                return Ok(PartCopy::Gone);
            };
            if !meta.same_versions(first) {
                return Ok(PartCopy::VersionsChanged);
            }
            if !data.is_empty() && data.len() as u64 != len {
                return Err(format!(
                    "piece of chunk {chunk} at {offset}: {} bytes, expected {len}",
                    data.len()
                ));
            }
            *bytes += data.len() as u64;
            // Zero pages need no write in a fresh slot, except the first (it makes
            // the chunk), when the chunk has a snapshot the current part's (their
            // writes rebuild the snapshot by copy-on-write), and a clone's (an
            // unwritten page would read its source's bytes).
            let must_write = offset == 0
                || first.clone_source.is_some()
                || (part == ImagePart::Current && first.snapshot_sn.is_some());
            if !data.is_empty() || must_write {
                let data = if data.is_empty() {
                    Bytes::from(vec![0u8; len as usize])
                } else {
                    data
                };
                self.write_image_piece(copy.copyset, copy.staging, sn, offset, data)
                    .await
                    .map_err(local)?;
            }
            offset += len;
        }
        Ok(PartCopy::Whole)
    }

    /// Whether this shard's `chunk` already is what a copy of the image described by `source`
    /// would give: the same last applied entry (a chunk's content is a function of the log
    /// entries applied to it, and the index of the last one names that prefix) and the same
    /// versions. Both sides may hold pages of later entries besides (a fuzzy copy), which
    /// the log applies again either way. A chunk without a recorded index, with a snapshot or
    /// a lazy clone is always copied. This keeps an install from copying what did not
    /// change: a replica that fell behind a compaction usually misses writes to a few chunks.
    fn holds_image_of(&self, chunk: ChunkId, source: &ChunkImageMeta) -> bool {
        let Ok(local) = self.chunk_image_meta(chunk) else {
            return false;
        };
        local.applied != 0
            && local.applied == source.applied
            && local.same_versions(source)
            && local.snapshot_sn.is_none()
            && local.clone_source.is_none()
    }

    /// Prepares the shard for an image of `copyset` that holds `keep`: deletes its chunks the
    /// image lacks, and its lazy clones not `copied` yet (they are made again from the image;
    /// a clone goes before its source, which refuses deletion while clones of it exist).
    pub async fn prepare_image(
        &self,
        copyset: CopysetId,
        keep: &BTreeSet<ChunkId>,
        copied: &BTreeSet<ChunkId>,
    ) -> Result<(), StorageError> {
        // Images staged by an attempt of this install that was cut short.
        self.remove_staged_images(Some(copyset)).await?;
        let mut chunks = self.chunks_of(copyset);
        // Clones are listed last: delete from the end.
        chunks.reverse();
        for chunk in chunks {
            let is_clone = self.chunk_info(chunk)?.clone_source.is_some();
            if !keep.contains(&chunk) || (is_clone && !copied.contains(&chunk)) {
                self.delete_chunk(chunk, LogIndex(0)).await?;
            }
        }
        Ok(())
    }
}

/// Chunk ids from here on (2^32 of them) are reserved for staged images; no client may use
/// them (the volume table's chunk lies above them).
pub const STAGING_BASE: u64 = 0xFFFF_FFF0_0000_0000;
const STAGING_IDS: u64 = 1 << 32;

/// One attempt at copying a chunk's image (see `ShardEngine::copy_chunk_image`).
struct ImageCopy {
    /// The copyset whose image it is.
    copyset: CopysetId,
    /// The chunk copied.
    chunk: ChunkId,
    /// The id the image is staged under until it is whole.
    staging: ChunkId,
    /// The versions and the applied index the source reported before any byte was read.
    first: ChunkImageMeta,
    /// The chunk's size.
    chunk_size: u64,
    /// The most bytes one piece asks for.
    piece_bytes: u64,
}

/// How copying one part of a chunk's image ended.
enum PartCopy {
    /// Every piece was copied.
    Whole,
    /// The chunk is gone at the source.
    Gone,
    /// A piece was read under other versions than the first: the chunk starts over.
    VersionsChanged,
}

/// Chunks retired by swaps that may wait for a checkpoint before the swap runs one.
const RETIRED_MAX: usize = 4;

/// Whether `chunk` is a staged image's id (see `STAGING_BASE`).
pub fn is_staging(chunk: ChunkId) -> bool {
    (STAGING_BASE..STAGING_BASE + STAGING_IDS).contains(&chunk.0)
}
