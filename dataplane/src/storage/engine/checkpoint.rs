//! The checkpoint: what makes chunk metadata and copyset state durable and lets the WAL
//! reclaim what is applied.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use raftcore::{HardState, LogIndex, LogStorage, SnapshotMeta};

use super::device::{
    encode_copyset_page, writable, write_anchor, Anchor, CopysetPage, COPYSET_PAGE_FIXED,
};
use super::ShardEngine;
use crate::storage::bdev::Bdev;
use crate::storage::layout::{seal_page, PageKind, Writer, PAGE_HEADER_LEN};
use crate::storage::table::ChunkId;
use crate::storage::wal::log::CopysetLog;
use crate::storage::wal::record::{conf_state_bytes, CopysetId};
use crate::storage::StorageError;

/// A local async mutex: the checkpoint runs one at a time.
#[derive(Debug, Default)]
pub(super) struct Turnstile {
    pub(super) busy: Cell<bool>,
    pub(super) waiters: RefCell<Vec<Waker>>,
}

pub(super) struct TurnstileGuard<'a>(&'a Turnstile);

impl Drop for TurnstileGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        for waker in self.0.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

pub(super) struct Enter<'a>(&'a Turnstile);

impl<'a> Future for Enter<'a> {
    type Output = TurnstileGuard<'a>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TurnstileGuard<'a>> {
        if self.0.busy.get() {
            let mut waiters = self.0.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        } else {
            self.0.busy.set(true);
            Poll::Ready(TurnstileGuard(self.0))
        }
    }
}

#[derive(Debug)]
pub(super) struct CheckpointState {
    /// Generation of the anchor on the device.
    pub(super) generation: u64,
    /// Which anchor copy holds it.
    pub(super) anchor_copy: u8,
    /// Per metadata page, the copy holding its current version.
    pub(super) meta_copy: Vec<u8>,
    /// Per copyset, its page and the copy holding its current version.
    pub(super) copyset_pages: BTreeMap<CopysetId, (u32, u8)>,
    /// Pages of deleted copysets, free again, with the copy that holds the tombstone (a page
    /// whose copyset id is 0): a new copyset there writes the other copy first, so a torn
    /// write cannot bring back the deleted copyset's older copy.
    pub(super) tombstones: BTreeMap<u32, u8>,
    /// Slots taken from the pool since the last checkpoint.
    /// Invariant: at most `RECOVERY_ZERO_SLOTS`.
    pub(super) allocations: u32,
    /// Free slots that may hold bytes from before a crash.
    pub(super) maybe_dirty: BTreeSet<u32>,
    /// Set when a checkpoint failed after it began writing: whether its pages or anchor
    /// reached the device is unknown, so no further checkpoint may write over them. The shard
    /// must restart; recovery sorts out what committed.
    pub(super) failed: Option<String>,
}

impl<B: Bdev> ShardEngine<B> {
    /// Makes the chunk metadata and every copyset's state durable and lets the WAL reclaim
    /// what the copysets have applied. Runs one at a time.
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        self.checkpoint_covering(None).await
    }

    /// A checkpoint, or with `covering`, none when one that began after preservation number
    /// `covering` was marked has completed meanwhile: the first writes after a snapshot that
    /// wait at once share one checkpoint instead of running one each.
    pub(super) async fn checkpoint_covering(
        &self,
        covering: Option<u64>,
    ) -> Result<(), StorageError> {
        {
            let _turn = Enter(&self.checkpoint_turn).await;
            if covering.is_some_and(|v| self.preserved.get().1 >= v) {
                return Ok(());
            }
            if let Some(reason) = &self.checkpoint.borrow().failed {
                return Err(StorageError::WalFailed(format!(
                    "an earlier checkpoint failed ({reason}); restart the shard"
                )));
            }
            // Everything marked by now is captured by the checkpoint below (marks only add).
            let marked = self.preserved.get().0;
            if let Err(error) = self.checkpoint_once().await {
                if self.checkpoint.borrow().failed.is_some() {
                    self.wal.fail(&error.to_string());
                }
                return Err(error);
            }
            let (now, durable) = self.preserved.get();
            self.preserved.set((now, durable.max(marked)));
        }
        // Chunks an install retired, now that the committed table no longer names them as
        // the chunks they replaced.
        self.delete_retired().await
    }

    pub(super) fn poison(&self, error: &StorageError) {
        self.checkpoint.borrow_mut().failed = Some(error.to_string());
    }

    pub(super) async fn checkpoint_once(&self) -> Result<(), StorageError> {
        // 0. Entries that cannot be applied yet (a copyset idle, without quorum, or behind
        // an install) would pin the head where they are: when reclaiming what is applied is
        // not enough, they move forward first, so ring use after the checkpoint is bounded by
        // the live entries alone (docs/architecture.md, "WAL space").
        self.move_pinning_entries();

        // 1. Everything appended so far is durable, so the state captured below is.
        let appended = self.wal.appended();
        self.wal.sync(appended).await?;
        let generation = self.checkpoint.borrow().generation + 1;

        // 2. Capture the copysets' states and where the WAL can start.
        let captured = self.capture_copysets(appended)?;

        // 3. The chunk data of every applied write is durable before metadata says so.
        if let Err(error) = self.bdev.flush().await {
            let error = StorageError::from(error);
            self.poison(&error);
            return Err(error);
        }

        // 4. Changed metadata pages and the copyset pages go to their alternate copies.
        // (No await from here to the encoding of the pages: what they record is this
        // instant's table, renames of retired chunks included.)
        let taken = self.take_changes();
        // The allocations these pages record; those made while they are written count
        // against the next checkpoint.
        let recorded_allocations = self.checkpoint.borrow().allocations;
        let result = self
            .write_checkpoint_pages(
                generation,
                &taken.dirty,
                &taken.dirty_bitmaps,
                &captured.copyset_pages,
            )
            .await;
        let bitmap_targets = match result {
            Ok(targets) => targets,
            Err(error) => return Err(self.give_back(taken, error)),
        };

        // 5. The anchor commits the generation and moves the WAL head.
        let anchor_copy = self.checkpoint.borrow().anchor_copy ^ 1;
        let anchor = Anchor {
            head: captured.head,
            clean: false,
            maybe_dirty: self.checkpoint.borrow().maybe_dirty.clone(),
        };
        let anchored =
            write_anchor(&*self.bdev, &self.layout, anchor_copy, generation, &anchor).await;
        if let Err(error) = anchored {
            return Err(self.give_back(taken, error));
        }
        self.retired_durable.borrow_mut().extend(taken.retired);

        // 6. The new state is the current one.
        let committed = Committed {
            generation,
            anchor_copy,
            dirty: taken.dirty,
            recorded_allocations,
            bitmap_targets,
        };
        self.adopt_checkpoint(committed, captured);
        Ok(())
    }

    /// Step 4 of a checkpoint: takes what changed since the last one (metadata pages, page
    /// bitmaps, retired chunks) for the pages to record.
    fn take_changes(&self) -> Taken {
        let dirty = self.table.borrow_mut().take_dirty();
        let dirty_bitmaps = std::mem::take(&mut *self.dirty_bitmaps.borrow_mut());
        let retired = std::mem::take(&mut *self.retired.borrow_mut());
        Taken {
            dirty,
            dirty_bitmaps,
            retired,
        }
    }

    /// A checkpoint that failed after [`take_changes`](Self::take_changes): gives back what
    /// it took, for the next one to record, poisons the checkpoint, and returns `error`.
    fn give_back(&self, taken: Taken, error: StorageError) -> StorageError {
        self.table.borrow_mut().restore_dirty(taken.dirty);
        self.dirty_bitmaps.borrow_mut().extend(taken.dirty_bitmaps);
        self.retired.borrow_mut().extend(taken.retired);
        self.poison(&error);
        error
    }

    /// Step 6 of a checkpoint, once its anchor is written: the new generation, page copies
    /// and allocation count are the current ones, the WAL's head moves and the in-memory
    /// logs are compacted.
    fn adopt_checkpoint(&self, committed: Committed, captured: Captured) {
        {
            let mut state = self.checkpoint.borrow_mut();
            state.generation = committed.generation;
            state.anchor_copy = committed.anchor_copy;
            for page in &committed.dirty {
                if let Some(copy) = state.meta_copy.get_mut(*page as usize) {
                    *copy ^= 1;
                }
            }
            for (copyset, index, copy, _) in &captured.copyset_pages {
                if copyset.0 != 0 {
                    state.copyset_pages.insert(*copyset, (*index, *copy));
                }
            }
            for (copyset, index, copy) in &captured.removed {
                state.copyset_pages.remove(copyset);
                state.tombstones.insert(*index, *copy);
            }
            state.allocations -= committed.recorded_allocations;
        }
        for (slot, copy) in committed.bitmap_targets {
            self.bitmap_copies.borrow_mut().insert(slot, copy);
        }
        self.wal.advance_head(captured.head);
        for (copyset, keep) in captured.compact_to {
            self.wal
                .with_log_mut(copyset, |current| current.compact(keep));
        }
    }

    /// Step 2 of a checkpoint: every copyset's page as of now (a tombstone for each deleted
    /// one), where the WAL's head can move, and how far each in-memory log is compacted.
    fn capture_copysets(&self, appended: u64) -> Result<Captured, StorageError> {
        let logs = self.wal.logs();
        let mut head = self.wal.durable();
        // Applied entries whose records lie in the ring's recent history stay in the
        // in-memory log (see `WalBudget::retention`): where each copyset's log is compacted
        // to. Only in memory: the head still passes their records, since replay from below
        // the live entries could meet records a later truncation superseded.
        let floor = appended.saturating_sub(self.wal.budget().retention());
        let mut captured = Captured {
            head: 0,
            compact_to: Vec::with_capacity(logs.len()),
            copyset_pages: Vec::new(),
            removed: Vec::new(),
        };
        let mut state = self.checkpoint.borrow_mut();
        for (copyset, log) in &logs {
            if let Some(lsn) = log.first_needed_lsn(log.applied) {
                head = head.min(lsn);
            }
            captured
                .compact_to
                .push((*copyset, log.retention_point(floor)));
            let (index, copy) = self.copyset_page_index(&mut state, *copyset)?;
            let (page, snapshot_lsn) = self.copyset_page_of(*copyset, log, appended);
            if let Some(lsn) = snapshot_lsn {
                head = head.min(lsn);
            }
            captured
                .copyset_pages
                .push((*copyset, index, copy ^ 1, page));
        }
        // Deleted copysets: a tombstone over their page, in the same generation as the WAL
        // head that forgets their records.
        for (copyset, (index, copy)) in &state.copyset_pages {
            if logs.contains_key(copyset) {
                continue;
            }
            captured.removed.push((*copyset, *index, copy ^ 1));
            captured.copyset_pages.push((
                CopysetId(0),
                *index,
                copy ^ 1,
                CopysetPage {
                    copyset: CopysetId(0),
                    hard_state: HardState::default(),
                    snapshot: SnapshotMeta::default(),
                    data: Bytes::new(),
                    replay_from: 0,
                },
            ));
        }
        captured.head = head;
        Ok(captured)
    }

    /// The page index of `copyset` and the copy last written there; a new copyset takes a
    /// free index.
    fn copyset_page_index(
        &self,
        state: &mut CheckpointState,
        copyset: CopysetId,
    ) -> Result<(u32, u8), StorageError> {
        if let Some(found) = state.copyset_pages.get(&copyset) {
            return Ok(*found);
        }
        let max = self.layout.geometry.max_copysets;
        let used: BTreeSet<u32> = state.copyset_pages.values().map(|(i, _)| *i).collect();
        let index = (0..max).find(|i| !used.contains(i)).ok_or_else(|| {
            StorageError::Copyset(
                copyset.0,
                format!("the shard holds its maximum of {max} copysets"),
            )
        })?;
        let copy = state.tombstones.remove(&index).unwrap_or(1);
        state.copyset_pages.insert(copyset, (index, copy));
        Ok((index, copy))
    }

    /// The page that records `log` now, and the position of a snapshot record the WAL must
    /// keep when the snapshot's image is too large for the page.
    fn copyset_page_of(
        &self,
        copyset: CopysetId,
        log: &CopysetLog,
        appended: u64,
    ) -> (CopysetPage, Option<u64>) {
        let mut snapshot = log.snapshot.clone();
        let mut data = log.snapshot_data.clone();
        if log.applied > snapshot.index {
            if let Ok(term) = log.term(log.applied) {
                // The engine compacts to the applied index: the chunks are the image.
                snapshot.index = log.applied;
                snapshot.term = term;
                data = Bytes::new();
            }
        }
        snapshot.conf_state = log.conf_state.clone();
        let room = self.layout.geometry.page_size as usize - PAGE_HEADER_LEN - COPYSET_PAGE_FIXED;
        let mut keep_record = None;
        if conf_state_bytes(&snapshot.conf_state).len() + data.len() > room {
            // Too large for the page: the WAL keeps the snapshot's record instead.
            keep_record = log.snapshot_lsn;
            data = Bytes::new();
        }
        let page = CopysetPage {
            copyset,
            hard_state: log.hard_state,
            snapshot,
            data,
            // Everything above the applied index has its record here or later (moved or
            // not); entries appended from now on land at `appended` or later.
            replay_from: log.first_needed_lsn(log.applied).unwrap_or(appended),
        };
        (page, keep_record)
    }

    /// Encodes every changed page at one instant (no await in between, so chunk metadata,
    /// page bitmaps and applied indices agree with each other), then writes them all to their
    /// alternate copies and flushes.
    pub(super) async fn write_checkpoint_pages(
        &self,
        generation: u64,
        dirty: &BTreeSet<u32>,
        dirty_bitmaps: &BTreeSet<u32>,
        copyset_pages: &[(CopysetId, u32, u8, CopysetPage)],
    ) -> Result<Vec<(u32, u8)>, StorageError> {
        let page = self.layout.geometry.page_size as usize;
        let mut writes =
            Vec::with_capacity(dirty.len() + dirty_bitmaps.len() + copyset_pages.len());
        let mut bitmap_targets = Vec::new();
        {
            let table = self.table.borrow();
            let state = self.checkpoint.borrow();
            for index in dirty {
                let copy = state.meta_copy.get(*index as usize).map_or(0, |c| c ^ 1);
                let mut buffer = self.bdev.alloc(page)?;
                let bytes = writable(&mut buffer)?;
                table.encode_page(*index, &mut bytes[PAGE_HEADER_LEN..]);
                seal_page(bytes, PageKind::ChunkMeta, u64::from(*index), generation);
                writes.push((self.layout.meta_page(*index, copy), buffer));
            }
        }
        {
            let bitmaps = self.bitmaps.borrow();
            let sources = self.clone_sources.borrow();
            for slot in dirty_bitmaps {
                let Some((bitmap, _)) = bitmaps.get(slot) else {
                    continue; // the snapshot or clone is gone: its bitmap is not needed
                };
                // Never over the copy the last committed checkpoint wrote: the committed
                // metadata may still need it.
                let target = self.bitmap_copies.borrow().get(slot).map_or(0, |c| c ^ 1);
                let mut buffer = self.bdev.alloc(page)?;
                let bytes = writable(&mut buffer)?;
                let mut w = Writer::new(&mut bytes[PAGE_HEADER_LEN..]);
                if let Some(source) = sources.get(slot) {
                    w.u64(source.0);
                }
                for word in bitmap {
                    w.u64(*word);
                }
                seal_page(bytes, PageKind::Bitmap, u64::from(*slot), generation);
                writes.push((self.layout.bitmap_page(*slot, target), buffer));
                bitmap_targets.push((*slot, target));
            }
        }
        for (_, index, copy, state) in copyset_pages {
            let mut buffer = self.bdev.alloc(page)?;
            let bytes = writable(&mut buffer)?;
            encode_copyset_page(state, &mut bytes[PAGE_HEADER_LEN..])?;
            seal_page(bytes, PageKind::Copyset, u64::from(*index), generation);
            writes.push((self.layout.copyset_page(*index, *copy), buffer));
        }
        for (offset, buffer) in writes {
            self.bdev.write(offset, buffer).await?;
        }
        self.bdev.flush().await?;
        Ok(bitmap_targets)
    }

    /// Closes the shard cleanly: a checkpoint, then an anchor saying that no slot was taken
    /// from the pool since, so the next open has no possibly dirty slots.
    pub async fn close(self) -> Result<(), StorageError> {
        self.checkpoint().await?;
        let _turn = Enter(&self.checkpoint_turn).await;
        let (copy, generation, anchor) = {
            let state = self.checkpoint.borrow();
            let anchor = Anchor {
                head: self.wal.head(),
                clean: true,
                maybe_dirty: state.maybe_dirty.clone(),
            };
            (state.anchor_copy ^ 1, state.generation + 1, anchor)
        };
        write_anchor(&*self.bdev, &self.layout, copy, generation, &anchor).await
    }

    /// Moves the live entries that keep the WAL's head back forward, when a checkpoint that
    /// only reclaims what is applied would leave more in use than a checkpoint is due at.
    pub(super) fn move_pinning_entries(&self) {
        let budget = self.wal.budget();
        let appended = self.wal.appended();
        let Some(pinned_from) = self.wal.oldest_live_lsn() else {
            return;
        };
        if !budget.worth_moving(appended - pinned_from) {
            return;
        }
        // Every live entry moves: ring use after this checkpoint is then bounded by the live
        // bytes alone, which the WAL's admission rule relies on.
        let (copysets, bytes) = self.wal.move_live_entries(appended);
        if copysets > 0 {
            tracing::info!(
                copysets,
                bytes,
                "WAL: live entries moved forward so the checkpoint can reclaim the ring"
            );
        }
    }

    /// Runs a checkpoint when one is due (see `WalBudget::due`), or when client data was
    /// refused for room since the last call.
    pub async fn maybe_checkpoint(&self) -> Result<bool, StorageError> {
        let wanted = self.wal.take_wanted();
        if wanted || self.wal.budget().due(self.wal.used()) {
            self.checkpoint().await?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// What step 2 of a checkpoint captured.
struct Captured {
    /// Where the WAL's head may move once the checkpoint committed.
    head: u64,
    /// Per copyset, the index its in-memory log is compacted to.
    compact_to: Vec<(CopysetId, LogIndex)>,
    /// Pages to write: (copyset, page index, copy, page).
    copyset_pages: Vec<(CopysetId, u32, u8, CopysetPage)>,
    /// Deleted copysets: (copyset, page index, copy of their tombstone).
    removed: Vec<(CopysetId, u32, u8)>,
}

/// What step 4 of a checkpoint took from the engine to record: given back if the checkpoint
/// fails.
struct Taken {
    /// Chunk metadata pages changed since the last checkpoint.
    dirty: BTreeSet<u32>,
    /// Page bitmaps changed since the last checkpoint.
    dirty_bitmaps: BTreeSet<u32>,
    /// Chunks retired by swaps since the last checkpoint.
    retired: Vec<ChunkId>,
}

/// What a checkpoint whose anchor is written changes in the engine's checkpoint state.
struct Committed {
    /// The generation the anchor committed.
    generation: u64,
    /// The anchor copy written.
    anchor_copy: u8,
    /// The chunk metadata pages written (to their alternate copies).
    dirty: BTreeSet<u32>,
    /// The allocations the pages recorded.
    recorded_allocations: u32,
    /// The page bitmaps written: (slot, copy).
    bitmap_targets: Vec<(u32, u8)>,
}
