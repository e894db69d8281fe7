//! Opening a shard's engine: reading the superblock, the anchor and the pages a checkpoint
//! committed, wiping what a checkpoint that never committed left, and replaying the WAL.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::checkpoint::{CheckpointState, Turnstile};
use super::device::{
    corrupt, decode_copyset_page, leftovers, read_superblock, write_anchor, Anchor,
    ANCHOR_DIRTY_MAX,
};
use super::{EngineOptions, RecoveredCopyset, Recovery, ShardEngine, RECOVERY_ZERO_SLOTS};
use crate::storage::bdev::Bdev;
use crate::storage::layout::{
    choose_copy, open_page, PageKind, PageRead, Reader, ShardLayout, Superblock,
};
use crate::storage::table::{ChunkId, ChunkTable, SlotState, FLAG_CLONE};
use crate::storage::wal::log::CopysetLog;
use crate::storage::wal::record::CopysetId;
use crate::storage::wal::{ShardWal, WalConfig, WalRecovery};
use crate::storage::StorageError;

impl<B: Bdev> ShardEngine<B> {
    /// Opens shard `shard` of a formatted device and recovers it.
    pub async fn open(
        bdev: Rc<B>,
        shard: u32,
        options: EngineOptions,
    ) -> Result<(ShardEngine<B>, Recovery), StorageError> {
        let superblock = read_superblock(&*bdev).await?;
        let layout = superblock.geometry.shard_layout(shard)?;

        // The anchor: the valid copy with the higher generation.
        let (mut generation, anchor, mut anchor_copy) = read_anchor(&*bdev, &layout).await?;

        // The pages the anchor's generation committed; copies newer or torn go to `wipe`.
        let mut wipe = Vec::new();
        let CopysetPages {
            logs,
            copyset_pages,
            tombstones,
        } = read_copyset_pages(&*bdev, &layout, generation, &mut wipe).await?;
        let (mut table, meta_copy) =
            read_chunk_table(&*bdev, &layout, generation, &mut wipe).await?;
        let bitmaps = read_bitmaps(&*bdev, &layout, &table, generation, &mut wipe).await?;

        let mut maybe_dirty = possibly_dirty_slots(&layout, &mut table, &anchor);
        zero_dirty_slots_past_anchor_room(&*bdev, &layout, &mut maybe_dirty).await?;
        // The wiping is durable before the anchor moves the generation past the leftovers.
        wipe_leftovers(&*bdev, &layout, wipe).await?;
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

        let (wal, report) = recover_wal(Rc::clone(&bdev), &layout, options, head, logs).await?;
        let recovery = Recovery {
            generation: recovered_generation,
            chunks: table.chunks().count(),
            wal_records: report.records,
            wal_stop: report.stop,
            wal_skipped: report.skipped,
            possibly_dirty_slots: maybe_dirty.len(),
            copysets: recovered_copysets(&wal),
        };
        let checkpoint = CheckpointState {
            generation,
            anchor_copy,
            meta_copy,
            copyset_pages,
            tombstones,
            allocations: 0,
            maybe_dirty,
            failed: None,
        };
        let engine =
            ShardEngine::assemble(bdev, layout, superblock, table, wal, checkpoint, bitmaps);
        Ok((engine, recovery))
    }

    /// The engine recovery found, with nothing staged, retired or changed since.
    fn assemble(
        bdev: Rc<B>,
        layout: ShardLayout,
        superblock: Superblock,
        table: ChunkTable,
        wal: ShardWal<B>,
        checkpoint: CheckpointState,
        bitmaps: Bitmaps,
    ) -> ShardEngine<B> {
        ShardEngine {
            bdev,
            layout,
            superblock,
            table: RefCell::new(table),
            wal,
            checkpoint: RefCell::new(checkpoint),
            checkpoint_turn: Turnstile::default(),
            preserved: Cell::new((0, 0)),
            bitmaps: RefCell::new(bitmaps.bitmaps),
            bitmap_copies: RefCell::new(bitmaps.bitmap_copies),
            dirty_bitmaps: RefCell::new(BTreeSet::new()),
            clone_sources: RefCell::new(bitmaps.clone_sources),
            clone_epoch: Cell::new(0),
            staging: Cell::new(0),
            retired: RefCell::new(Vec::new()),
            retired_durable: RefCell::new(Vec::new()),
        }
    }
}

/// Reads the anchor: the valid copy with the higher generation, as (generation, anchor, copy).
async fn read_anchor<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
) -> Result<(u64, Anchor, u8), StorageError> {
    let page = layout.geometry.page_size as usize;
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
    Ok((generation, anchor, anchor_copy))
}

/// The two copies of page `number` of `kind`, as read back, from the `page`-sized halves of
/// `bytes[at..at + 2 * page]` (a missing half reads as a page too short for its header).
fn page_copies(
    bytes: &[u8],
    at: usize,
    page: usize,
    kind: PageKind,
    number: u64,
) -> [PageRead<'_>; 2] {
    [0, 1].map(|copy: usize| {
        let bytes = bytes
            .get(at + copy * page..at + (copy + 1) * page)
            .unwrap_or(&[]);
        open_page(bytes, kind, number)
    })
}

/// Of a page's two copies, the one the anchor's `generation` committed (its index and body,
/// `None` for a blank page), and whether the other copy is a leftover to wipe. A page with no
/// copy to believe is corrupt metadata (`what`, at `offset`).
fn committed_copy<'a>(
    copies: [PageRead<'a>; 2],
    generation: u64,
    what: &'static str,
    offset: u64,
) -> Result<(u8, Option<&'a [u8]>, bool), StorageError> {
    let stale = leftovers(&copies, generation);
    let (copy, _, body) =
        choose_copy(copies, generation).map_err(|reason| corrupt(what, offset, reason))?;
    Ok((copy, body, stale[usize::from(copy ^ 1)]))
}

/// What the committed copyset pages hold.
struct CopysetPages {
    /// Per copyset, its log as the checkpoint left it (WAL replay goes on from there).
    logs: BTreeMap<CopysetId, CopysetLog>,
    /// Per copyset, its page and the copy holding its current version.
    copyset_pages: BTreeMap<CopysetId, (u32, u8)>,
    /// Pages of deleted copysets, with the copy that holds the tombstone.
    tombstones: BTreeMap<u32, u8>,
}

/// Reads the copyset pages; the leftover copies to wipe go to `wipe`.
async fn read_copyset_pages<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    generation: u64,
    wipe: &mut Vec<u64>,
) -> Result<CopysetPages, StorageError> {
    let geometry = layout.geometry;
    let page = geometry.page_size as usize;
    // Copyset pages.
    let max_copysets = geometry.max_copysets as usize;
    let copyset_bytes = bdev
        .read(layout.copysets, bdev.alloc(2 * page * max_copysets)?)
        .await?;
    let mut logs = BTreeMap::new();
    let mut copyset_pages = BTreeMap::new();
    let mut tombstones = BTreeMap::new();
    for index in 0..geometry.max_copysets {
        let offset = layout.copyset_page(index, 0);
        let at = 2 * page * index as usize;
        let copies = page_copies(
            copyset_bytes.as_slice(),
            at,
            page,
            PageKind::Copyset,
            u64::from(index),
        );
        let (copy, body, stale) = committed_copy(copies, generation, "copyset page", offset)?;
        if stale {
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
        log.replay_from = state.replay_from;
        logs.insert(state.copyset, log);
    }
    Ok(CopysetPages {
        logs,
        copyset_pages,
        tombstones,
    })
}

/// Reads the chunk metadata pages into the chunk table; returns it with, per page, the copy
/// holding its current version. The leftover copies to wipe go to `wipe`.
async fn read_chunk_table<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    generation: u64,
    wipe: &mut Vec<u64>,
) -> Result<(ChunkTable, Vec<u8>), StorageError> {
    let geometry = layout.geometry;
    let page = geometry.page_size as usize;
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
        let copies = page_copies(
            meta_bytes.as_slice(),
            at,
            page,
            PageKind::ChunkMeta,
            u64::from(index),
        );
        let (copy, body, stale) =
            committed_copy(copies, generation, "chunk metadata page", offset)?;
        if stale {
            wipe.push(layout.meta_page(index, copy ^ 1));
        }
        meta_copy[index as usize] = copy;
        table
            .load_page(index, body)
            .map_err(|e| corrupt("chunk metadata page", offset, e.to_string()))?;
    }
    Ok((table, meta_copy))
}

/// The page bitmaps recovery read, as the engine keeps them.
struct Bitmaps {
    /// Per snapshot or clone slot, its bitmap and the copy holding its current version.
    bitmaps: BTreeMap<u32, (Vec<u64>, u8)>,
    /// Per lazy clone slot, the chunk its unwritten pages read from.
    clone_sources: BTreeMap<u32, ChunkId>,
    /// Per slot, the bitmap copy that holds its latest written version.
    bitmap_copies: BTreeMap<u32, u8>,
}

/// Reads the page bitmaps of the snapshot and clone slots `table` holds (and a clone's
/// source); the leftover copies to wipe go to `wipe`.
async fn read_bitmaps<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    table: &ChunkTable,
    generation: u64,
    wipe: &mut Vec<u64>,
) -> Result<Bitmaps, StorageError> {
    let geometry = layout.geometry;
    let page = geometry.page_size as usize;
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
        let copies = page_copies(pair.as_slice(), 0, page, PageKind::Bitmap, u64::from(slot));
        let (copy, body, stale) = committed_copy(copies, generation, "page bitmap", offset)?;
        if stale {
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
    Ok(Bitmaps {
        bitmaps,
        clone_sources,
        bitmap_copies,
    })
}

/// The free slots that may hold stale bytes, with the slots that were being released
/// returned to the pool (in memory; no I/O).
fn possibly_dirty_slots(
    layout: &ShardLayout,
    table: &mut ChunkTable,
    anchor: &Anchor,
) -> BTreeSet<u32> {
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
    maybe_dirty
}

/// Zeroes the possibly dirty slots past what an anchor can list (the highest ones), and
/// forgets them.
async fn zero_dirty_slots_past_anchor_room<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    maybe_dirty: &mut BTreeSet<u32>,
) -> Result<(), StorageError> {
    // An anchor can list only so many; zero the rest now.
    while maybe_dirty.len() > ANCHOR_DIRTY_MAX / 2 {
        let Some(slot) = maybe_dirty.pop_last() else {
            break;
        };
        bdev.write_zeroes(layout.slot_offset(slot), layout.geometry.chunk_size)
            .await?;
    }
    debug_assert!(maybe_dirty.len() <= ANCHOR_DIRTY_MAX / 2);
    Ok(())
}

/// Zeroes the leftover page copies in `wipe` and, when there were any, flushes.
async fn wipe_leftovers<B: Bdev>(
    bdev: &B,
    layout: &ShardLayout,
    wipe: Vec<u64>,
) -> Result<(), StorageError> {
    let page = layout.geometry.page_size as usize;
    if !wipe.is_empty() {
        for offset in wipe {
            bdev.write_zeroes(offset, page as u64).await?;
        }
        bdev.flush().await?;
    }
    Ok(())
}

/// Opens the shard's WAL ring and replays it from `head` on top of the checkpointed `logs`.
async fn recover_wal<B: Bdev>(
    bdev: Rc<B>,
    layout: &ShardLayout,
    options: EngineOptions,
    head: u64,
    logs: BTreeMap<CopysetId, CopysetLog>,
) -> Result<(ShardWal<B>, WalRecovery), StorageError> {
    let geometry = layout.geometry;
    let block = u64::from(geometry.block_size);
    let max_batch =
        crate::storage::wal::max_batch_for(geometry.wal_size, block, options.wal_max_batch);
    let config = WalConfig {
        ring_offset: layout.wal,
        ring_size: geometry.wal_size,
        block_size: block,
        max_batch,
    };
    ShardWal::recover(bdev, config, head, logs).await
}

/// Every copyset the WAL holds after replay: its persisted state, and the committed entries
/// above its checkpointed applied index to apply again.
fn recovered_copysets<B: Bdev>(wal: &ShardWal<B>) -> Vec<RecoveredCopyset> {
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
    copysets
}
