//! One shard's storage engine: the chunk store and the shard WAL on one region of a device,
//! and the checkpoint that ties them together.
//!
//! Durability rests on the WAL. A chunk write is applied without a flush; the copyset's
//! applied index is only remembered in memory. A checkpoint flushes the device, writes the
//! changed chunk-metadata pages and every copyset's state (hard state, membership, applied
//! index) into the alternate copies of their pages, flushes, and finally writes the anchor
//! with the new generation and WAL head, and flushes. Recovery believes pages no newer than
//! the anchor, then replays the WAL from the head; the chunkserver re-applies committed
//! entries above each copyset's checkpointed applied index, which is idempotent.
//!
//! Free slots read as zeroes. A slot is zeroed before it returns to the pool. After a crash,
//! the slots that may have been written since the last checkpoint without their metadata
//! reaching the device are the lowest free ones (the pool always hands out the lowest free
//! slot, and a checkpoint is forced after [`RECOVERY_ZERO_SLOTS`] allocations); recovery marks
//! those, and the slots that were being released, as possibly dirty, and a possibly dirty slot
//! is zeroed when it is next taken. The anchor lists the possibly dirty slots and says whether
//! the pool was untouched since it was written (format, or a clean close), so a fresh or
//! cleanly closed device has none.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use raftcore::{
    ConfState, Entry, HardState, LogIndex, LogStorage, NodeId, SnapshotMeta, SnapshotPiece,
    StorageError as RaftStorageError, Term,
};

use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::layout::{
    choose_copy, open_page, seal_page, Geometry, PageKind, PageRead, Reader, ShardLayout,
    Superblock, Writer, FORMAT_VERSION, PAGE_HEADER_LEN,
};
use crate::storage::table::{
    ChunkId, ChunkTable, SlotMeta, SlotState, TableError, FLAG_CLONE, NO_SLOT,
};
use crate::storage::wal::log::CopysetLog;
use crate::storage::wal::record::{conf_state_bytes, decode_conf_state, CopysetId};
use crate::storage::wal::{ShardWal, WalConfig};
use crate::storage::StorageError;

/// Allocations allowed between checkpoints; recovery zeroes this many of the lowest free
/// slots. Part of the format: changing it changes what recovery must zero.
pub const RECOVERY_ZERO_SLOTS: u32 = 32;

/// How to lay out a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatOptions {
    /// Page size.
    pub page_size: u32,
    /// Chunk (slot) size.
    pub chunk_size: u64,
    /// WAL ring size per shard.
    pub wal_size: u64,
    /// Shards on the device.
    pub shard_count: u32,
    /// Copysets per shard.
    pub max_copysets: u32,
    /// The device reads as zeroes already (a file just created and filled): format then
    /// writes only the metadata, not the WAL rings and slots.
    pub device_is_zeroed: bool,
}

impl FormatOptions {
    /// Options from the configuration's `[storage]` section.
    pub fn from_config(storage: &crate::config::StorageSection, shard_count: u32) -> Self {
        FormatOptions {
            page_size: storage.page_size.bytes() as u32,
            chunk_size: storage.chunk_size.bytes(),
            wal_size: storage.wal_size_per_shard.bytes(),
            shard_count,
            max_copysets: storage.max_copysets_per_shard,
            device_is_zeroed: false,
        }
    }
}

/// How a shard runs its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Largest WAL batch (one write and one flush).
    pub wal_max_batch: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            wal_max_batch: crate::storage::wal::DEFAULT_MAX_BATCH,
        }
    }
}

/// Lays out `bdev`: zeroes the metadata (and, unless the device is known to be zeroed, the
/// WAL rings and slots), then writes the superblock last, so a device whose format was cut
/// short is refused. Returns the superblock written.
pub async fn format<B: Bdev>(
    bdev: &B,
    options: &FormatOptions,
    uuid: [u8; 16],
) -> Result<Superblock, StorageError> {
    let geometry = Geometry {
        block_size: bdev.block_size(),
        page_size: options.page_size,
        chunk_size: options.chunk_size,
        wal_size: options.wal_size,
        shard_count: options.shard_count,
        max_copysets: options.max_copysets,
        device_size: bdev.capacity(),
    };
    let page = u64::from(geometry.page_size);
    // Wipe the old superblock first: a format interrupted from here on leaves no device.
    bdev.write_zeroes(0, page).await?;
    bdev.flush().await?;
    for shard in 0..geometry.shard_count {
        let layout = geometry.shard_layout(shard)?;
        let (start, len) = layout.metadata_range();
        bdev.write_zeroes(start, len).await?;
        if !options.device_is_zeroed {
            bdev.write_zeroes(layout.wal, layout.end() - layout.wal)
                .await?;
        }
        // Every slot reads as zeroes and none was ever taken: a clean anchor says so.
        let clean = Anchor {
            clean: true,
            ..Anchor::default()
        };
        write_anchor(bdev, &layout, 0, 1, &clean).await?;
    }
    bdev.flush().await?;
    let superblock = Superblock {
        version: FORMAT_VERSION,
        uuid,
        geometry,
    };
    let mut buffer = bdev.alloc(page as usize)?;
    superblock.encode(writable(&mut buffer)?);
    bdev.write(0, buffer).await?;
    bdev.flush().await?;
    Ok(superblock)
}

/// What the anchor page holds besides its header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Anchor {
    /// Where WAL replay starts.
    head: u64,
    /// Written by format or a clean close: no slot was taken from the pool since.
    clean: bool,
    /// Free slots that may hold bytes from before a crash; zeroed before they are used.
    maybe_dirty: BTreeSet<u32>,
}

/// Most slots an anchor page lists as possibly dirty (a 4 KiB page holds about a thousand).
const ANCHOR_DIRTY_MAX: usize = 512;

impl Anchor {
    fn encode(&self, page: &mut [u8], generation: u64) {
        {
            let mut w = Writer::new(&mut page[PAGE_HEADER_LEN..]);
            w.u64(self.head);
            w.u32(u32::from(self.clean));
            w.u32(self.maybe_dirty.len() as u32);
            for slot in &self.maybe_dirty {
                w.u32(*slot);
            }
        }
        seal_page(page, PageKind::Anchor, 0, generation);
    }

    fn decode(body: &[u8]) -> Option<Anchor> {
        let mut r = Reader::new(body);
        let head = r.u64();
        let clean = r.u32() & 1 != 0;
        let count = r.u32() as usize;
        if count > ANCHOR_DIRTY_MAX {
            return None;
        }
        let maybe_dirty = (0..count).map(|_| r.u32()).collect();
        if r.overrun() {
            return None;
        }
        Some(Anchor {
            head,
            clean,
            maybe_dirty,
        })
    }
}

async fn write_anchor<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    copy: u8,
    generation: u64,
    anchor: &Anchor,
) -> Result<(), StorageError> {
    let mut buffer = bdev.alloc(layout.geometry.page_size as usize)?;
    anchor.encode(writable(&mut buffer)?, generation);
    bdev.write(layout.anchor_page(copy), buffer).await?;
    bdev.flush().await?;
    Ok(())
}

fn writable(buffer: &mut DmaBuf) -> Result<&mut [u8], StorageError> {
    buffer
        .as_mut_slice()
        .ok_or_else(|| StorageError::Geometry("a device buffer is not writable".into()))
}

/// Reads and checks the superblock, refusing a device this build cannot use.
pub async fn read_superblock<B: Bdev>(bdev: &B) -> Result<Superblock, StorageError> {
    let probe = 4096.max(bdev.block_size() as usize);
    if bdev.capacity() < probe as u64 {
        return Err(StorageError::BadSuperblock(
            "the device is smaller than a superblock".into(),
        ));
    }
    let buffer = bdev.read(0, bdev.alloc(probe)?).await?;
    let superblock = Superblock::decode(buffer.as_slice())?;
    let geometry = superblock.geometry;
    if geometry.block_size != bdev.block_size() {
        return Err(StorageError::BadSuperblock(format!(
            "formatted for blocks of {} bytes but the device has {}",
            geometry.block_size,
            bdev.block_size()
        )));
    }
    if geometry.device_size > bdev.capacity() {
        return Err(StorageError::BadSuperblock(format!(
            "formatted for {} bytes but the device has only {}",
            geometry.device_size,
            bdev.capacity()
        )));
    }
    Ok(superblock)
}

/// What a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its size (every chunk has the slot size).
    pub size: u64,
    /// Its sequence number.
    pub sn: u64,
    /// Its snapshot's sequence number, if it has one.
    pub snapshot_sn: Option<u64>,
    /// Curve's corrected sn.
    pub corrected_sn: u64,
    /// For a lazy clone, the chunk its unwritten pages read from.
    pub clone_source: Option<ChunkId>,
}

/// A copyset as recovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredCopyset {
    /// Which.
    pub copyset: CopysetId,
    /// Its persisted hard state.
    pub hard_state: HardState,
    /// Its persisted membership.
    pub conf_state: ConfState,
    /// The applied index the last checkpoint made durable.
    pub applied: LogIndex,
    /// Committed entries above `applied`, to apply again (idempotently) in order.
    pub to_apply: Vec<Entry>,
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint generation recovery started from.
    pub generation: u64,
    /// Chunks in the table.
    pub chunks: usize,
    /// WAL records replayed.
    pub wal_records: usize,
    /// Why the WAL scan stopped.
    pub wal_stop: String,
    /// Free slots that may hold bytes from before a crash (zeroed when next taken).
    pub possibly_dirty_slots: usize,
    /// The copysets, in id order.
    pub copysets: Vec<RecoveredCopyset>,
}

/// A local async mutex: the checkpoint runs one at a time.
#[derive(Debug, Default)]
struct Turnstile {
    busy: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

struct TurnstileGuard<'a>(&'a Turnstile);

impl Drop for TurnstileGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        for waker in self.0.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

struct Enter<'a>(&'a Turnstile);

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
struct CheckpointState {
    /// Generation of the anchor on the device.
    generation: u64,
    /// Which anchor copy holds it.
    anchor_copy: u8,
    /// Per metadata page, the copy holding its current version.
    meta_copy: Vec<u8>,
    /// Per copyset, its page and the copy holding its current version.
    copyset_pages: BTreeMap<CopysetId, (u32, u8)>,
    /// Pages of deleted copysets, free again, with the copy that holds the tombstone (a page
    /// whose copyset id is 0): a new copyset there writes the other copy first, so a torn
    /// write cannot bring back the deleted copyset's older copy.
    tombstones: BTreeMap<u32, u8>,
    /// Slots taken from the pool since the last checkpoint.
    /// Invariant: at most `RECOVERY_ZERO_SLOTS`.
    allocations: u32,
    /// Free slots that may hold bytes from before a crash.
    maybe_dirty: BTreeSet<u32>,
    /// Set when a checkpoint failed after it began writing: whether its pages or anchor
    /// reached the device is unknown, so no further checkpoint may write over them. The shard
    /// must restart; recovery sorts out what committed.
    failed: Option<String>,
}

/// The storage engine of one shard.
#[derive(Debug)]
pub struct ShardEngine<B: Bdev> {
    bdev: Rc<B>,
    layout: ShardLayout,
    superblock: Superblock,
    table: RefCell<ChunkTable>,
    wal: ShardWal<B>,
    checkpoint: RefCell<CheckpointState>,
    checkpoint_turn: Turnstile,
    /// Page bitmaps of the slots that have one in use (snapshots), with the copy on the
    /// device that holds the current version.
    bitmaps: RefCell<BTreeMap<u32, (Vec<u64>, u8)>>,
    /// Bitmap pages changed since the last checkpoint.
    dirty_bitmaps: RefCell<BTreeSet<u32>>,
    /// Lazy clone chunks (by slot) and the chunk their unwritten pages read from. A clone's
    /// bitmap (in `bitmaps`) marks the pages written since it was created.
    clone_sources: RefCell<BTreeMap<u32, ChunkId>>,
    /// Per slot, the bitmap copy that holds its latest written version. Kept when a snapshot
    /// or clone goes away: until a checkpoint commits that, the committed metadata may still
    /// need that copy, so a new bitmap in the same slot must go to the other one.
    bitmap_copies: RefCell<BTreeMap<u32, u8>>,
    /// Counts changes of which chunks are lazy clones of which (a clone made, flattened or
    /// deleted): a copyset image copied while it changed must start over, since whether a
    /// write to a source is refused depends on them.
    clone_epoch: Cell<u64>,
    /// The next staged image's id (see `engine::image::STAGING_BASE`).
    staging: Cell<u64>,
    /// Chunks an install's swap retired (renamed to staging ids) that no checkpoint has
    /// recorded as retired yet: until one does, the committed table still names their slots
    /// as the chunks they replaced, so their bytes must stay (see `engine::image`).
    retired: RefCell<Vec<ChunkId>>,
    /// Retired chunks whose retirement a checkpoint committed: free to delete.
    retired_durable: RefCell<Vec<ChunkId>>,
}

/// Which of a page's two copies are leftovers to wipe: a copy newer than the anchor was
/// written by a checkpoint that never committed, and a corrupt one by a torn write. Left in
/// place, such a copy could pass for committed once a later checkpoint raises the generation
/// past its own.
fn leftovers(copies: &[PageRead<'_>; 2], anchor_generation: u64) -> [bool; 2] {
    copies.each_ref().map(|copy| match copy {
        PageRead::Valid { generation, .. } => *generation > anchor_generation,
        PageRead::Corrupt(_) => true,
        PageRead::Blank => false,
    })
}

fn corrupt(what: &'static str, offset: u64, reason: String) -> StorageError {
    StorageError::CorruptMetadata {
        what,
        offset,
        reason,
    }
}

struct CopysetPage {
    copyset: CopysetId,
    hard_state: HardState,
    snapshot: SnapshotMeta,
    /// The snapshot's image when it fits in the page (else the WAL keeps its record).
    data: Bytes,
}

/// Bytes of a copyset page body besides the membership and the snapshot image.
const COPYSET_PAGE_FIXED: usize = 56;

fn encode_copyset_page(page: &CopysetPage, body: &mut [u8]) -> Result<(), StorageError> {
    let conf = conf_state_bytes(&page.snapshot.conf_state);
    if COPYSET_PAGE_FIXED + conf.len() + page.data.len() > body.len() {
        return Err(StorageError::Copyset(
            page.copyset.0,
            "membership too large for a copyset page".into(),
        ));
    }
    let mut w = Writer::new(body);
    w.u64(page.copyset.0);
    w.u64(page.hard_state.term.0);
    w.u64(page.hard_state.vote.map_or(0, |v| v.0));
    w.u64(page.hard_state.commit.0);
    w.u64(page.snapshot.index.0);
    w.u64(page.snapshot.term.0);
    w.u32(conf.len() as u32);
    w.bytes(&conf);
    w.u32(page.data.len() as u32);
    w.bytes(&page.data);
    Ok(())
}

fn decode_copyset_page(body: &[u8]) -> Option<CopysetPage> {
    let mut r = Reader::new(body);
    let copyset = CopysetId(r.u64());
    let hard_state = HardState {
        term: Term(r.u64()),
        vote: Some(r.u64()).filter(|v| *v != 0).map(NodeId),
        commit: LogIndex(r.u64()),
    };
    let index = LogIndex(r.u64());
    let term = Term(r.u64());
    let conf_len = r.u32() as usize;
    let conf = r.take(conf_len)?;
    let conf_state = decode_conf_state(&mut Reader::new(conf))?;
    let data_len = r.u32() as usize;
    let data = Bytes::copy_from_slice(r.take(data_len)?);
    if r.overrun() {
        return None;
    }
    Some(CopysetPage {
        copyset,
        hard_state,
        snapshot: SnapshotMeta {
            index,
            term,
            conf_state,
        },
        data,
    })
}

impl<B: Bdev> ShardEngine<B> {
    /// Opens shard `shard` of a formatted device and recovers it.
    pub async fn open(
        bdev: Rc<B>,
        shard: u32,
        options: EngineOptions,
    ) -> Result<(ShardEngine<B>, Recovery), StorageError> {
        let superblock = read_superblock(&*bdev).await?;
        let layout = superblock.geometry.shard_layout(shard)?;
        let geometry = layout.geometry;
        let page = geometry.page_size as usize;

        // The anchor: the valid copy with the higher generation.
        let anchors = bdev.read(layout.anchor, bdev.alloc(2 * page)?).await?;
        let mut generation = 0;
        let mut anchor = Anchor::default();
        let mut anchor_copy = 1;
        let mut reasons = Vec::new();
        for copy in 0..2u8 {
            let bytes = anchors
                .as_slice()
                .get(copy as usize * page..(copy as usize + 1) * page)
                .unwrap_or(&[]);
            match open_page(bytes, PageKind::Anchor, 0) {
                PageRead::Blank => {}
                PageRead::Valid {
                    generation: g,
                    body,
                } => {
                    if g > generation {
                        match Anchor::decode(body) {
                            Some(decoded) => {
                                generation = g;
                                anchor = decoded;
                                anchor_copy = copy;
                            }
                            None => reasons.push(format!("copy {copy}: fields do not decode")),
                        }
                    }
                }
                PageRead::Corrupt(reason) => reasons.push(format!("copy {copy}: {reason}")),
            }
        }
        if reasons.len() == 2 {
            return Err(corrupt("WAL anchor", layout.anchor, reasons.join("; ")));
        }

        // Copyset pages.
        let max_copysets = geometry.max_copysets as usize;
        let copyset_bytes = bdev
            .read(layout.copysets, bdev.alloc(2 * page * max_copysets)?)
            .await?;
        let mut logs = BTreeMap::new();
        let mut copyset_pages = BTreeMap::new();
        let mut tombstones = BTreeMap::new();
        let mut wipe = Vec::new();
        for index in 0..geometry.max_copysets {
            let offset = layout.copyset_page(index, 0);
            let at = 2 * page * index as usize;
            let copies = [0, 1].map(|copy: usize| {
                let bytes = copyset_bytes
                    .as_slice()
                    .get(at + copy * page..at + (copy + 1) * page)
                    .unwrap_or(&[]);
                open_page(bytes, PageKind::Copyset, u64::from(index))
            });
            let stale = leftovers(&copies, generation);
            let (copy, _, body) = choose_copy(copies, generation)
                .map_err(|reason| corrupt("copyset page", offset, reason))?;
            if stale[usize::from(copy ^ 1)] {
                wipe.push(layout.copyset_page(index, copy ^ 1));
            }
            let Some(body) = body else { continue };
            let state = decode_copyset_page(body)
                .ok_or_else(|| corrupt("copyset page", offset, "fields do not decode".into()))?;
            if state.copyset.0 == 0 {
                tombstones.insert(index, copy);
                continue;
            }
            copyset_pages.insert(state.copyset, (index, copy));
            let mut log = CopysetLog::from_checkpoint(
                state.hard_state,
                state.snapshot.conf_state.clone(),
                state.snapshot,
            );
            log.snapshot_data = state.data;
            logs.insert(state.copyset, log);
        }

        // Chunk metadata pages.
        let mut table = ChunkTable::new(layout.slots, geometry.entries_per_page());
        let meta_bytes = bdev
            .read(
                layout.meta,
                bdev.alloc(2 * page * layout.meta_pages as usize)?,
            )
            .await?;
        let mut meta_copy = vec![1u8; layout.meta_pages as usize];
        for index in 0..layout.meta_pages {
            let offset = layout.meta_page(index, 0);
            let at = 2 * page * index as usize;
            let copies = [0, 1].map(|copy: usize| {
                let bytes = meta_bytes
                    .as_slice()
                    .get(at + copy * page..at + (copy + 1) * page)
                    .unwrap_or(&[]);
                open_page(bytes, PageKind::ChunkMeta, u64::from(index))
            });
            let stale = leftovers(&copies, generation);
            let (copy, _, body) = choose_copy(copies, generation)
                .map_err(|reason| corrupt("chunk metadata page", offset, reason))?;
            if stale[usize::from(copy ^ 1)] {
                wipe.push(layout.meta_page(index, copy ^ 1));
            }
            meta_copy[index as usize] = copy;
            table
                .load_page(index, body)
                .map_err(|e| corrupt("chunk metadata page", offset, e.to_string()))?;
        }
        drop(meta_bytes);

        // Page bitmaps of snapshot and clone slots.
        let mut bitmaps = BTreeMap::new();
        let bitmap_slots: Vec<u32> = (0..layout.slots)
            .filter(|slot| {
                table.slot(*slot).is_some_and(|m| {
                    m.state == SlotState::Snapshot
                        || (m.state == SlotState::Chunk && m.flags & FLAG_CLONE != 0)
                })
            })
            .collect();
        let words = geometry.pages_per_chunk().div_ceil(64) as usize;
        let mut clone_sources = BTreeMap::new();
        let mut bitmap_copies = BTreeMap::new();
        for slot in bitmap_slots {
            let offset = layout.bitmap_page(slot, 0);
            let pair = bdev.read(offset, bdev.alloc(2 * page)?).await?;
            let copies = [0, 1].map(|copy: usize| {
                let bytes = pair
                    .as_slice()
                    .get(copy * page..(copy + 1) * page)
                    .unwrap_or(&[]);
                open_page(bytes, PageKind::Bitmap, u64::from(slot))
            });
            let stale = leftovers(&copies, generation);
            let (copy, _, body) = choose_copy(copies, generation)
                .map_err(|reason| corrupt("page bitmap", offset, reason))?;
            if stale[usize::from(copy ^ 1)] {
                wipe.push(layout.bitmap_page(slot, copy ^ 1));
            }
            let is_clone = table
                .slot(slot)
                .is_some_and(|m| m.state == SlotState::Chunk && m.flags & FLAG_CLONE != 0);
            let bitmap = match body {
                None => vec![0; words],
                Some(body) => {
                    let mut r = Reader::new(body);
                    if is_clone {
                        clone_sources.insert(slot, ChunkId(r.u64()));
                    }
                    (0..words).map(|_| r.u64()).collect()
                }
            };
            if is_clone && !clone_sources.contains_key(&slot) {
                return Err(corrupt(
                    "page bitmap",
                    offset,
                    "a clone chunk's bitmap does not name its source".into(),
                ));
            }
            bitmaps.insert(slot, (bitmap, copy));
            bitmap_copies.insert(slot, copy);
        }

        // Free slots that may hold stale bytes: those listed by the anchor, those that were
        // being released, and, unless the anchor says nothing was taken from the pool since
        // it was written, the lowest free ones (where the allocations since went). They are
        // zeroed when they are next taken, not now: recovery costs no data I/O.
        let mut maybe_dirty = anchor.maybe_dirty.clone();
        let releasing: Vec<u32> = (0..layout.slots)
            .filter(|s| {
                table
                    .slot(*s)
                    .is_some_and(|m| m.state == SlotState::Releasing)
            })
            .collect();
        for slot in releasing {
            table.release_done(slot);
            maybe_dirty.insert(slot);
        }
        if !anchor.clean {
            let mut remaining = RECOVERY_ZERO_SLOTS as usize;
            for (first, count) in table.free_runs() {
                for slot in first..first + count {
                    if remaining == 0 {
                        break;
                    }
                    maybe_dirty.insert(slot);
                    remaining -= 1;
                }
            }
        }
        maybe_dirty.retain(|slot| {
            table
                .slot(*slot)
                .is_some_and(|m| m.state == SlotState::Free)
        });
        // An anchor can list only so many; zero the rest now.
        while maybe_dirty.len() > ANCHOR_DIRTY_MAX / 2 {
            let Some(slot) = maybe_dirty.pop_last() else {
                break;
            };
            bdev.write_zeroes(layout.slot_offset(slot), geometry.chunk_size)
                .await?;
        }
        // The wiping is durable before the anchor moves the generation past the leftovers.
        if !wipe.is_empty() {
            for offset in wipe {
                bdev.write_zeroes(offset, page as u64).await?;
            }
            bdev.flush().await?;
        }
        // From here on slots may be taken: the anchor must no longer say clean.
        let recovered_generation = generation;
        generation += 1;
        anchor_copy ^= 1;
        let opened = Anchor {
            head: anchor.head,
            clean: false,
            maybe_dirty: maybe_dirty.clone(),
        };
        write_anchor(&*bdev, &layout, anchor_copy, generation, &opened).await?;
        let head = anchor.head;

        let block = u64::from(geometry.block_size);
        let max_batch =
            crate::storage::wal::max_batch_for(geometry.wal_size, block, options.wal_max_batch);
        let config = WalConfig {
            ring_offset: layout.wal,
            ring_size: geometry.wal_size,
            block_size: block,
            max_batch,
        };
        let (wal, report) = ShardWal::recover(Rc::clone(&bdev), config, head, logs).await?;

        let mut copysets = Vec::new();
        for copyset in wal.copysets() {
            let recovered = wal.with_log(copyset, |log| {
                let applied = log.snapshot.index;
                RecoveredCopyset {
                    copyset,
                    hard_state: log.hard_state,
                    conf_state: log.conf_state.clone(),
                    applied,
                    to_apply: log.entries_between(applied.next(), log.hard_state.commit.next()),
                }
            });
            copysets.extend(recovered);
        }
        let recovery = Recovery {
            generation: recovered_generation,
            chunks: table.chunks().count(),
            wal_records: report.records,
            wal_stop: report.stop,
            possibly_dirty_slots: maybe_dirty.len(),
            copysets,
        };
        let engine = ShardEngine {
            bdev,
            layout,
            superblock,
            table: RefCell::new(table),
            wal,
            checkpoint: RefCell::new(CheckpointState {
                generation,
                anchor_copy,
                meta_copy,
                copyset_pages,
                tombstones,
                allocations: 0,
                maybe_dirty,
                failed: None,
            }),
            checkpoint_turn: Turnstile::default(),
            bitmaps: RefCell::new(bitmaps),
            bitmap_copies: RefCell::new(bitmap_copies),
            dirty_bitmaps: RefCell::new(BTreeSet::new()),
            clone_sources: RefCell::new(clone_sources),
            clone_epoch: Cell::new(0),
            staging: Cell::new(0),
            retired: RefCell::new(Vec::new()),
            retired_durable: RefCell::new(Vec::new()),
        };
        Ok((engine, recovery))
    }

    /// The shard's WAL: append entries and hard state, then `sync`.
    pub fn wal(&self) -> &ShardWal<B> {
        &self.wal
    }

    /// The device.
    pub fn bdev(&self) -> &Rc<B> {
        &self.bdev
    }

    /// Where this shard's structures are.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The device's superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Bytes the in-memory chunk table holds, and its slot count.
    pub fn table_memory(&self) -> (usize, u32) {
        let table = self.table.borrow();
        (table.memory_bytes(), table.slot_count())
    }

    /// Raft's read view of one copyset's log.
    pub fn log_storage(&self, copyset: CopysetId) -> CopysetStorage<B> {
        CopysetStorage {
            wal: self.wal.clone(),
            copyset,
        }
    }

    /// Records that the state machine of `copyset` has applied everything up to `index`.
    /// Call it only once every write of those entries has completed.
    pub fn set_applied(&self, copyset: CopysetId, index: LogIndex) {
        self.wal.with_log_mut(copyset, |log| {
            if index > log.applied {
                log.applied = index;
            }
        });
    }

    /// Checks an operation's geometry (page alignment, inside the chunk) before it is
    /// proposed, as its apply would; the apply checks again.
    pub fn check_op(&self, op: &crate::copyset::ChunkOp) -> Result<(), StorageError> {
        use crate::copyset::ChunkOp;
        let source = match op {
            ChunkOp::CreateClone { source, .. } => Some(*source),
            _ => None,
        };
        for chunk in std::iter::once(op.chunk()).chain(source) {
            if image::is_staging(chunk) {
                return Err(StorageError::Conflict {
                    chunk,
                    reason: "chunk ids from 0xFFFFFFF000000000 are reserved for snapshot \
                             installs"
                        .into(),
                });
            }
        }
        match op {
            ChunkOp::Write { offset, data, .. } | ChunkOp::Paste { offset, data, .. } => {
                self.check_request(u64::from(*offset), data.len() as u64)
            }
            ChunkOp::Recover { offset, len, .. } => {
                self.check_request(u64::from(*offset), u64::from(*len))
            }
            _ => Ok(()),
        }
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let geometry = &self.layout.geometry;
        let page = u64::from(geometry.page_size);
        if len == 0 || offset % page != 0 || len % page != 0 {
            return Err(StorageError::Unaligned {
                offset,
                len,
                page: geometry.page_size,
            });
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > geometry.chunk_size)
        {
            return Err(StorageError::OutOfRange {
                offset,
                len,
                chunk_size: geometry.chunk_size,
            });
        }
        Ok(())
    }

    /// Takes a slot from the pool, first running a checkpoint if the allocations since the
    /// last one reached the bound recovery relies on.
    async fn allocate(&self, meta: SlotMeta) -> Result<u32, StorageError> {
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
    fn already_applied(&self, slot: u32, index: LogIndex) -> Result<bool, StorageError> {
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

    /// How many times clone relationships changed on this shard (see `clone_epoch`).
    pub fn clone_epoch(&self) -> u64 {
        self.clone_epoch.get()
    }

    /// Records that the entry at `index` is applied to the chunk in `slot`.
    fn record_applied(&self, chunk: ChunkId, index: LogIndex) {
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

    /// Refuses to change a chunk that lazy clones read through to: a clone's source is
    /// read-only while clones of it exist, so that re-applying a clone's recover or flatten
    /// after a crash reads what it read the first time.
    fn check_not_a_clone_source(&self, chunk: ChunkId) -> Result<(), StorageError> {
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
    fn mark_clone_pages_written(&self, slot: u32, offset: u64, len: u64) {
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
    fn clone_pages_missing(&self, slot: u32, offset: u64, len: u64) -> Vec<u64> {
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
    async fn fill_from_source(
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

    fn slot_meta(&self, slot: u32) -> Result<SlotMeta, StorageError> {
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
        let page = u64::from(self.layout.geometry.page_size);
        for p in missing {
            let from = self
                .bdev
                .read(
                    self.layout.slot_offset(source_slot) + p * page,
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
        Ok(data)
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

    /// Prepares `chunk` (in `slot`) for a write of `len` bytes at `offset` with sequence
    /// number `sn`: a newer sn than the chunk's (and than its corrected sn) first turns the
    /// current version into a snapshot; while a snapshot exists, the pages the write covers
    /// that the snapshot does not hold yet are copied into it, and a checkpoint makes the
    /// copies and the page bitmap durable before the write may overwrite them. Replaying the
    /// write after a crash then finds them preserved and copies nothing twice.
    async fn preserve_for_snapshot(
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
            if meta.link != NO_SLOT {
                let snapshot_sn = self.slot_meta(meta.link)?.sn;
                return Err(StorageError::Conflict {
                    chunk,
                    reason: format!(
                        "a write with sn {sn} needs a new snapshot but the chunk still has the                          one at sn {snapshot_sn}; delete it first"
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
        }
        if meta.link == NO_SLOT {
            return Ok(());
        }
        let snapshot = meta.link;
        let page = u64::from(self.layout.geometry.page_size);
        let first = (offset / page) as usize;
        let last = ((offset + len) / page) as usize;
        let missing: Vec<usize> = {
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
        };
        if missing.is_empty() {
            return Ok(());
        }
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
        if let Some((bitmap, _)) = self.bitmaps.borrow_mut().get_mut(&snapshot) {
            for p in &missing {
                if let Some(word) = bitmap.get_mut(p / 64) {
                    *word |= 1 << (p % 64);
                }
            }
        }
        self.dirty_bitmaps.borrow_mut().insert(snapshot);
        self.checkpoint().await
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
        for p in preserved {
            let old = self
                .bdev
                .read(
                    self.layout.slot_offset(snapshot) + p * page,
                    self.bdev.alloc(page as usize)?,
                )
                .await?;
            let at = (p * page - offset) as usize;
            if let Some(target) = data
                .as_mut_slice()
                .and_then(|d| d.get_mut(at..at + page as usize))
            {
                target.copy_from_slice(old.as_slice());
            }
        }
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
        let Some(slot) = self.table.borrow().lookup(chunk) else {
            return Ok(());
        };
        if self.already_applied(slot, index)? {
            return Ok(());
        }
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

    /// Makes the chunk metadata and every copyset's state durable and lets the WAL reclaim
    /// what the copysets have applied. Runs one at a time.
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        {
            let _turn = Enter(&self.checkpoint_turn).await;
            if let Some(reason) = &self.checkpoint.borrow().failed {
                return Err(StorageError::WalFailed(format!(
                    "an earlier checkpoint failed ({reason}); restart the shard"
                )));
            }
            if let Err(error) = self.checkpoint_once().await {
                if self.checkpoint.borrow().failed.is_some() {
                    self.wal.fail(&error.to_string());
                }
                return Err(error);
            }
        }
        // Chunks an install retired, now that the committed table no longer names them as
        // the chunks they replaced.
        self.delete_retired().await
    }

    fn poison(&self, error: &StorageError) {
        self.checkpoint.borrow_mut().failed = Some(error.to_string());
    }

    async fn checkpoint_once(&self) -> Result<(), StorageError> {
        let geometry = self.layout.geometry;
        let page = geometry.page_size as usize;

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
        let logs = self.wal.logs();
        let mut head = self.wal.durable();
        // Applied entries whose records lie in the ring's recent history stay in the log
        // (see `WalBudget::retention`): where each copyset's log is compacted to.
        let floor = appended.saturating_sub(self.wal.budget().retention(self.wal.live_bytes()));
        let mut compact_to = Vec::with_capacity(logs.len());
        let mut copyset_pages = Vec::new();
        let mut removed = Vec::new();
        {
            let mut state = self.checkpoint.borrow_mut();
            let used: BTreeSet<u32> = state.copyset_pages.values().map(|(i, _)| *i).collect();
            let mut free_pages = (0..geometry.max_copysets).filter(|i| !used.contains(i));
            for (copyset, log) in &logs {
                let keep = log.retention_point(floor);
                if let Some(lsn) = log.first_needed_lsn(keep) {
                    head = head.min(lsn);
                }
                compact_to.push((*copyset, keep));
                let (index, copy) = match state.copyset_pages.get(copyset) {
                    Some(found) => *found,
                    None => {
                        let index = free_pages.next().ok_or_else(|| {
                            StorageError::Copyset(
                                copyset.0,
                                format!(
                                    "the shard holds its maximum of {} copysets",
                                    geometry.max_copysets
                                ),
                            )
                        })?;
                        let copy = state.tombstones.remove(&index).unwrap_or(1);
                        state.copyset_pages.insert(*copyset, (index, copy));
                        (index, copy)
                    }
                };
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
                let room = page - PAGE_HEADER_LEN - COPYSET_PAGE_FIXED;
                if conf_state_bytes(&snapshot.conf_state).len() + data.len() > room {
                    // Too large for the page: the WAL keeps the snapshot's record instead.
                    if let Some(lsn) = log.snapshot_lsn {
                        head = head.min(lsn);
                    }
                    data = Bytes::new();
                }
                copyset_pages.push((
                    *copyset,
                    index,
                    copy ^ 1,
                    CopysetPage {
                        copyset: *copyset,
                        hard_state: log.hard_state,
                        snapshot,
                        data,
                    },
                ));
            }
            // Deleted copysets: a tombstone over their page, in the same generation as the
            // WAL head that forgets their records.
            for (copyset, (index, copy)) in &state.copyset_pages {
                if logs.contains_key(copyset) {
                    continue;
                }
                removed.push((*copyset, *index, copy ^ 1));
                copyset_pages.push((
                    CopysetId(0),
                    *index,
                    copy ^ 1,
                    CopysetPage {
                        copyset: CopysetId(0),
                        hard_state: HardState::default(),
                        snapshot: SnapshotMeta::default(),
                        data: Bytes::new(),
                    },
                ));
            }
        }

        // 3. The chunk data of every applied write is durable before metadata says so.
        if let Err(error) = self.bdev.flush().await {
            let error = StorageError::from(error);
            self.poison(&error);
            return Err(error);
        }

        // 4. Changed metadata pages and the copyset pages go to their alternate copies.
        // (No await from here to the encoding of the pages: what they record is this
        // instant's table, renames of retired chunks included.)
        let dirty = self.table.borrow_mut().take_dirty();
        let dirty_bitmaps = std::mem::take(&mut *self.dirty_bitmaps.borrow_mut());
        let retired = std::mem::take(&mut *self.retired.borrow_mut());
        // The allocations these pages record; those made while they are written count
        // against the next checkpoint.
        let recorded_allocations = self.checkpoint.borrow().allocations;
        let result = self
            .write_checkpoint_pages(generation, &dirty, &dirty_bitmaps, &copyset_pages)
            .await;
        let bitmap_targets = match &result {
            Ok(targets) => targets.clone(),
            Err(_) => Vec::new(),
        };
        if let Err(error) = result {
            self.table.borrow_mut().restore_dirty(dirty);
            self.dirty_bitmaps.borrow_mut().extend(dirty_bitmaps);
            self.retired.borrow_mut().extend(retired);
            self.poison(&error);
            return Err(error);
        }

        // 5. The anchor commits the generation and moves the WAL head.
        let anchor_copy = self.checkpoint.borrow().anchor_copy ^ 1;
        let anchor = Anchor {
            head,
            clean: false,
            maybe_dirty: self.checkpoint.borrow().maybe_dirty.clone(),
        };
        let anchored =
            write_anchor(&*self.bdev, &self.layout, anchor_copy, generation, &anchor).await;
        if let Err(error) = anchored {
            self.table.borrow_mut().restore_dirty(dirty);
            self.dirty_bitmaps.borrow_mut().extend(dirty_bitmaps);
            self.retired.borrow_mut().extend(retired);
            self.poison(&error);
            return Err(error);
        }
        self.retired_durable.borrow_mut().extend(retired);

        // 6. The new state is the current one.
        {
            let mut state = self.checkpoint.borrow_mut();
            state.generation = generation;
            state.anchor_copy = anchor_copy;
            for page in &dirty {
                if let Some(copy) = state.meta_copy.get_mut(*page as usize) {
                    *copy ^= 1;
                }
            }
            for (copyset, index, copy, _) in &copyset_pages {
                if copyset.0 != 0 {
                    state.copyset_pages.insert(*copyset, (*index, *copy));
                }
            }
            for (copyset, index, copy) in &removed {
                state.copyset_pages.remove(copyset);
                state.tombstones.insert(*index, *copy);
            }
            state.allocations -= recorded_allocations;
        }
        for (slot, copy) in bitmap_targets {
            self.bitmap_copies.borrow_mut().insert(slot, copy);
        }
        self.wal.advance_head(head);
        for (copyset, keep) in compact_to {
            self.wal
                .with_log_mut(copyset, |current| current.compact(keep));
        }
        Ok(())
    }

    /// Encodes every changed page at one instant (no await in between, so chunk metadata,
    /// page bitmaps and applied indices agree with each other), then writes them all to their
    /// alternate copies and flushes.
    async fn write_checkpoint_pages(
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
    fn move_pinning_entries(&self) {
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

/// Raft's read view of one copyset's log in the shard WAL.
#[derive(Debug)]
pub struct CopysetStorage<B: Bdev> {
    wal: ShardWal<B>,
    copyset: CopysetId,
}

impl<B: Bdev> CopysetStorage<B> {
    fn with<R>(&self, f: impl FnOnce(&CopysetLog) -> R) -> R {
        self.wal.with_log_or_empty(self.copyset, f)
    }
}

impl<B: Bdev> LogStorage for CopysetStorage<B> {
    fn initial_state(&self) -> Result<(HardState, ConfState), RaftStorageError> {
        self.with(|log| log.initial_state())
    }
    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.with(|log| log.entries(low, high, max_bytes))
    }
    fn term(&self, index: LogIndex) -> Result<Term, RaftStorageError> {
        self.with(|log| log.term(index))
    }
    fn first_index(&self) -> Result<LogIndex, RaftStorageError> {
        self.with(|log| log.first_index())
    }
    fn last_index(&self) -> Result<LogIndex, RaftStorageError> {
        self.with(|log| log.last_index())
    }
    fn snapshot_meta(&self) -> Result<SnapshotMeta, RaftStorageError> {
        self.with(|log| log.snapshot_meta())
    }
    fn snapshot_piece(
        &self,
        index: LogIndex,
        offset: u64,
        max_bytes: u64,
    ) -> Result<SnapshotPiece, RaftStorageError> {
        self.with(|log| log.snapshot_piece(index, offset, max_bytes))
    }
}

#[path = "engine_image.rs"]
mod image;
pub use image::{ChunkImageMeta, ImagePart, ImagePiece};

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
