//! Applying placement entries (`ChunkOp::Meta`) of the metadata copyset: each reads the tables
//! it needs from the engine, lets the pure `plan_*` function decide, and writes the records
//! that change — one chunk write per entry, so an entry is all or nothing on every replica.

use bytes::Bytes;
use raftcore::LogIndex;

use crate::ids::{ChunkId, CopysetId};
use crate::placement::meta::MetaOp;
use crate::placement::snapshots::{self, SnapshotTable};
use crate::placement::tables::{
    self, NODE_CHUNK, NODE_RECORD_LEN, POOL_CHUNK, POOL_RECORD_LEN, SEGMENT_RECORD_LEN,
};
use crate::storage::bdev::Bdev;
use crate::storage::engine::ShardEngine;
use crate::storage::StorageError;
use crate::volume_table::{self, VolumeLayout, METADATA_COPYSET, TABLE_CHUNK};

/// Bytes the pool table is read in: it is dense from its start, so reading stops at the
/// first piece with a free record.
const POOL_PIECE: u64 = 64 << 10;
const PAGE: usize = 4096;

/// Applies one placement entry of `copyset` at `index`.
pub(super) async fn apply_meta<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    op: MetaOp,
    index: LogIndex,
) -> Result<(), StorageError> {
    if copyset != METADATA_COPYSET {
        return Err(refused(
            TABLE_CHUNK,
            format!("placement entries belong to the metadata copyset, not {copyset}"),
        ));
    }
    match op {
        MetaOp::PoolCreate(request) => {
            let pool = read_pool(engine).await?;
            let planned = tables::plan_pool(&pool, &request).map_err(|e| refused(POOL_CHUNK, e))?;
            let Some(mut records) = planned else {
                return Ok(()); // the pool exists: creation is idempotent
            };
            // Whole pages: the records after the new ones are free (the pool was empty).
            records.resize(records.len().div_ceil(PAGE) * PAGE, 0);
            write(engine, POOL_CHUNK, 0, records, index).await
        }
        MetaOp::CopysetReady { copyset: ready } => {
            let pool = read_pool(engine).await?;
            let planned = tables::plan_ready(&pool, ready).map_err(|e| refused(POOL_CHUNK, e))?;
            write_planned(engine, POOL_CHUNK, &pool, POOL_RECORD_LEN, planned, index).await
        }
        MetaOp::VolumeCreate {
            name,
            size,
            segment_size,
        } => create_striped(engine, &name, size, segment_size, index).await,
        MetaOp::SegmentAllocate { volume, segment } => {
            allocate_segment(engine, volume, segment, index).await
        }
        MetaOp::NodeRegister(member) => register(engine, &member, index).await,
        MetaOp::SchedulerPaused(paused) => {
            let settings = tables::Settings { paused };
            write(engine, tables::SETTINGS_CHUNK, 0, settings.encode(), index).await
        }
        MetaOp::CopysetPeers { copyset, peers } => {
            let pool = read_pool(engine).await?;
            let planned =
                tables::plan_peers(&pool, copyset, &peers).map_err(|e| refused(POOL_CHUNK, e))?;
            write_planned(engine, POOL_CHUNK, &pool, POOL_RECORD_LEN, planned, index).await
        }
        MetaOp::SnapshotChunks {
            volume,
            seq,
            existed,
        } => snapshot_chunks(engine, volume, seq, &existed, index).await,
        MetaOp::SnapshotCreate { volume, .. }
        | MetaOp::SnapshotDeleting { volume, .. }
        | MetaOp::SnapshotDrop { volume, .. } => {
            let record = striped_volume(engine, volume).await?;
            let chunk = snapshots::snapshot_table_chunk(volume);
            let page = read_range(engine, chunk, 0, snapshots::HEADER_LEN as u64).await?;
            let table = SnapshotTable::decode(&page).map_err(|e| refused(chunk, e))?;
            let planned = match op {
                MetaOp::SnapshotCreate {
                    name, created_ms, ..
                } => {
                    snapshots::plan_create(&table, &record.name, record.chunks(), &name, created_ms)
                }
                MetaOp::SnapshotDeleting { name, .. } => {
                    snapshots::plan_deleting(&table, &record.name, &name)
                }
                MetaOp::SnapshotDrop { name, .. } => {
                    snapshots::plan_drop(&table, &record.name, &name)
                }
                _ => return Ok(()),
            }
            .map_err(|e| refused(chunk, e))?;
            write(engine, chunk, 0, planned.encode(), index).await
        }
    }
}

/// The striped volume with id `volume`.
async fn striped_volume<B: Bdev>(
    engine: &ShardEngine<B>,
    volume: u64,
) -> Result<volume_table::VolumeRecord, StorageError> {
    let table = read_table(engine).await?;
    volume_table::find_striped(&table, volume).map_err(|e| refused(TABLE_CHUNK, e))
}

/// Records the bitmap of the snapshot at `seq` in its region: the snapshot is ready.
async fn snapshot_chunks<B: Bdev>(
    engine: &ShardEngine<B>,
    volume: u64,
    seq: u64,
    existed: &[bool],
    index: LogIndex,
) -> Result<(), StorageError> {
    let record = striped_volume(engine, volume).await?;
    let chunk = snapshots::snapshot_table_chunk(volume);
    let page = read_range(engine, chunk, 0, snapshots::HEADER_LEN as u64).await?;
    let table = SnapshotTable::decode(&page).map_err(|e| refused(chunk, e))?;
    let Some(snapshot) = table.snapshots.iter().find(|s| s.seq == seq) else {
        return Err(refused(
            chunk,
            format!("no snapshot at sequence number {seq}"),
        ));
    };
    if existed.len() as u64 != record.chunks() {
        return Err(refused(
            chunk,
            format!(
                "a bitmap of {} chunks for a volume of {}",
                existed.len(),
                record.chunks()
            ),
        ));
    }
    let region = snapshots::encode_bitmap(seq, existed);
    write(
        engine,
        chunk,
        snapshots::bitmap_offset(snapshot.slot),
        region,
        index,
    )
    .await
}

/// Adds striped volume `name`; its id follows from the entry's index, so it is never the
/// same twice.
async fn create_striped<B: Bdev>(
    engine: &ShardEngine<B>,
    name: &str,
    size: u64,
    segment_size: u64,
    index: LogIndex,
) -> Result<(), StorageError> {
    let table = read_table(engine).await?;
    let chunk_size = engine.layout().geometry.chunk_size;
    let id = volume_table::FIRST_STRIPED_ID.saturating_add(index.0);
    let (record, volume) =
        volume_table::plan_create_striped(&table, name, size, chunk_size, segment_size, id)
            .map_err(|e| refused(TABLE_CHUNK, e))?;
    let offset = (record * volume_table::RECORD_LEN) as u64;
    write(engine, TABLE_CHUNK, offset, volume.encode(), index).await
}

/// Records `member` in the node table unless it is there as it is.
async fn register<B: Bdev>(
    engine: &ShardEngine<B>,
    member: &tables::PoolMember,
    index: LogIndex,
) -> Result<(), StorageError> {
    let table = read_dense(engine, NODE_CHUNK, NODE_RECORD_LEN).await?;
    let planned = tables::plan_register(&table, member).map_err(|e| refused(NODE_CHUNK, e))?;
    write_planned(engine, NODE_CHUNK, &table, NODE_RECORD_LEN, planned, index).await
}

/// Writes a planned record (its index and bytes, in records of `record_len`) into a table
/// chunk; nothing when the plan changes nothing.
async fn write_planned<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
    table: &[u8],
    record_len: usize,
    planned: Option<(usize, Vec<u8>)>,
    index: LogIndex,
) -> Result<(), StorageError> {
    match planned {
        None => Ok(()),
        Some((record, bytes)) => {
            write_record(engine, chunk, table, record * record_len, &bytes, index).await
        }
    }
}

/// Writes `bytes` at `at` of a table chunk whose current content starts with `table`: the
/// whole page around it, the rest of the page as it is.
async fn write_record<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
    table: &[u8],
    at: usize,
    bytes: &[u8],
    index: LogIndex,
) -> Result<(), StorageError> {
    let page_start = at / PAGE * PAGE;
    let mut page = table
        .get(page_start..page_start + PAGE)
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| vec![0u8; PAGE]);
    page[at - page_start..at - page_start + bytes.len()].copy_from_slice(bytes);
    write(engine, chunk, page_start as u64, page, index).await
}

/// Gives segment `segment` of striped volume `volume` its copysets unless it has them.
async fn allocate_segment<B: Bdev>(
    engine: &ShardEngine<B>,
    volume: u64,
    segment: u64,
    index: LogIndex,
) -> Result<(), StorageError> {
    let table = read_table(engine).await?;
    let record = volume_table::find_striped(&table, volume).map_err(|e| refused(TABLE_CHUNK, e))?;
    let VolumeLayout::Striped { segment_size, .. } = record.layout else {
        return Err(refused(TABLE_CHUNK, "not a striped volume"));
    };
    let chunks = segment_size / record.chunk_size.max(1);
    let segment_chunk = tables::segment_table_chunk(volume);
    let offset = segment
        .checked_mul(SEGMENT_RECORD_LEN as u64)
        .filter(|end| end + SEGMENT_RECORD_LEN as u64 <= engine.layout().geometry.chunk_size)
        .ok_or_else(|| refused(segment_chunk, format!("segment {segment} is out of range")))?;
    let existing = read_range(engine, segment_chunk, offset, SEGMENT_RECORD_LEN as u64).await?;
    let pool = read_pool(engine).await?;
    let planned =
        tables::plan_segment(&existing, &pool, volume, segment, record.segments(), chunks)
            .map_err(|e| refused(segment_chunk, e))?;
    match planned {
        None => Ok(()), // allocated already: the first allocation stands
        Some(segment_record) => {
            write(
                engine,
                segment_chunk,
                offset,
                segment_record.encode(),
                index,
            )
            .await
        }
    }
}

/// The whole volume table.
async fn read_table<B: Bdev>(engine: &ShardEngine<B>) -> Result<Vec<u8>, StorageError> {
    let chunk_size = engine.layout().geometry.chunk_size;
    read_range(engine, TABLE_CHUNK, 0, chunk_size).await
}

/// The pool table's records up to (and including) the first piece with a free record.
async fn read_pool<B: Bdev>(engine: &ShardEngine<B>) -> Result<Vec<u8>, StorageError> {
    read_dense(engine, POOL_CHUNK, POOL_RECORD_LEN).await
}

/// A dense table's records (`record_len` bytes each, free ones all zeros and only after the
/// last taken one) up to and including the first piece with a free record.
pub(super) async fn read_dense<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
    record_len: usize,
) -> Result<Vec<u8>, StorageError> {
    let chunk_size = engine.layout().geometry.chunk_size;
    let mut table = Vec::new();
    let mut offset = 0;
    while offset < chunk_size {
        let len = POOL_PIECE.min(chunk_size - offset);
        let piece = read_range(engine, chunk, offset, len).await?;
        let ended = piece
            .chunks_exact(record_len)
            .any(|r| r.iter().all(|b| *b == 0));
        table.extend_from_slice(&piece);
        if ended {
            break;
        }
        offset += len;
    }
    Ok(table)
}

/// Bytes `offset..offset + len` of a chunk of the metadata copyset; zeroes when it does not
/// exist.
pub(super) async fn read_range<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, StorageError> {
    match engine.read_chunk(chunk, offset, len).await {
        Ok(buffer) => Ok(buffer.as_slice().to_vec()),
        Err(StorageError::ChunkNotFound(_)) => Ok(vec![0u8; len as usize]),
        Err(error) => Err(error),
    }
}

async fn write<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
    offset: u64,
    bytes: Vec<u8>,
    index: LogIndex,
) -> Result<(), StorageError> {
    engine
        .write_chunk_bytes(
            METADATA_COPYSET,
            chunk,
            offset,
            Bytes::from(bytes),
            1,
            index,
        )
        .await
}

fn refused(chunk: ChunkId, reason: impl std::fmt::Display) -> StorageError {
    StorageError::Conflict {
        chunk,
        reason: reason.to_string(),
    }
}
