//! Formatting a device and the pages that tie the engine together: the superblock, the
//! anchor and the copyset pages.

use std::collections::BTreeSet;

use bytes::Bytes;
use raftcore::{HardState, LogIndex, NodeId, SnapshotMeta, Term};

use super::FormatOptions;
use crate::storage::bdev::Bdev;
use crate::storage::dma::DmaBuf;
use crate::storage::layout::{
    seal_page, Geometry, PageKind, PageRead, Reader, ShardLayout, Superblock, Writer,
    FORMAT_VERSION, PAGE_HEADER_LEN,
};
use crate::storage::wal::record::{conf_state_bytes, decode_conf_state, CopysetId};
use crate::storage::StorageError;

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
pub(super) struct Anchor {
    /// Where WAL replay starts.
    pub(super) head: u64,
    /// Written by format or a clean close: no slot was taken from the pool since.
    pub(super) clean: bool,
    /// Free slots that may hold bytes from before a crash; zeroed before they are used.
    pub(super) maybe_dirty: BTreeSet<u32>,
}

/// Most slots an anchor page lists as possibly dirty (a 4 KiB page holds about a thousand).
pub(super) const ANCHOR_DIRTY_MAX: usize = 512;

impl Anchor {
    pub(super) fn encode(&self, page: &mut [u8], generation: u64) {
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

    pub(super) fn decode(body: &[u8]) -> Option<Anchor> {
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

pub(super) async fn write_anchor<B: Bdev>(
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

pub(super) fn writable(buffer: &mut DmaBuf) -> Result<&mut [u8], StorageError> {
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

/// Which of a page's two copies are leftovers to wipe: a copy newer than the anchor was
/// written by a checkpoint that never committed, and a corrupt one by a torn write. Left in
/// place, such a copy could pass for committed once a later checkpoint raises the generation
/// past its own.
pub(super) fn leftovers(copies: &[PageRead<'_>; 2], anchor_generation: u64) -> [bool; 2] {
    copies.each_ref().map(|copy| match copy {
        PageRead::Valid { generation, .. } => *generation > anchor_generation,
        PageRead::Corrupt(_) => true,
        PageRead::Blank => false,
    })
}

pub(super) fn corrupt(what: &'static str, offset: u64, reason: String) -> StorageError {
    StorageError::CorruptMetadata {
        what,
        offset,
        reason,
    }
}

pub(super) struct CopysetPage {
    pub(super) copyset: CopysetId,
    pub(super) hard_state: HardState,
    pub(super) snapshot: SnapshotMeta,
    /// The snapshot's image when it fits in the page (else the WAL keeps its record).
    pub(super) data: Bytes,
    /// Replay takes this copyset's entry records from this ring position on: every entry
    /// the log held at the checkpoint has its record there or later, and an earlier record
    /// is a copy made again since (a move, a retried append) or one a truncation replaced.
    /// 0 (pages written before this field): every record from the head.
    pub(super) replay_from: u64,
}

/// Bytes of a copyset page body besides the membership and the snapshot image.
pub(super) const COPYSET_PAGE_FIXED: usize = 64;

pub(super) fn encode_copyset_page(page: &CopysetPage, body: &mut [u8]) -> Result<(), StorageError> {
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
    // Last, so that a page without it (zeroes there) reads as 0: replay everything.
    w.u64(page.replay_from);
    Ok(())
}

pub(super) fn decode_copyset_page(body: &[u8]) -> Option<CopysetPage> {
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
    let replay_from = r.u64();
    Some(CopysetPage {
        copyset,
        hard_state,
        snapshot: SnapshotMeta {
            index,
            term,
            conf_state,
        },
        data,
        replay_from,
    })
}
