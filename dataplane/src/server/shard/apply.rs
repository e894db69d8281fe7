//! Applying committed chunk operations to the engine.

use bytes::Bytes;
use raftcore::LogIndex;

use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::storage::bdev::Bdev;
use crate::storage::engine::ShardEngine;
use crate::storage::StorageError;

/// Applies one committed chunk operation of `copyset` at `index` to the engine.
pub(super) async fn apply_op<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    op: ChunkOp,
    index: LogIndex,
) -> Result<(), StorageError> {
    if let ChunkOp::Write {
        chunk,
        sn,
        offset,
        data,
    } = op
    {
        let offset = u64::from(offset);
        return engine
            .write_chunk_bytes(copyset, chunk, offset, data, sn, index)
            .await;
    }
    engine.check_owner(op.chunk(), copyset)?;
    match op {
        ChunkOp::Write { .. } => Ok(()), // handled above
        ChunkOp::Delete { chunk, .. } => engine.delete_chunk(chunk, index).await,
        ChunkOp::DeleteSnapshotOrCorrectSn { chunk, sn } => {
            engine.delete_snapshot_or_correct_sn(chunk, sn, index).await
        }
        ChunkOp::Fence { chunk, sn } => engine.fence_chunk(chunk, sn, index).await,
        ChunkOp::CreateClone { chunk, source, sn } => {
            // A clone's source belongs to the same copyset, so every replica has it.
            engine.check_owner(source, copyset)?;
            engine
                .create_clone_chunk_in(copyset, chunk, source, sn, index)
                .await
        }
        ChunkOp::Paste {
            chunk,
            offset,
            data,
        } => {
            let buffer = engine.bdev().pool().from_bytes_or_copy(data)?;
            engine
                .paste_chunk(chunk, u64::from(offset), buffer, index)
                .await
        }
        ChunkOp::Recover { chunk, offset, len } => {
            engine
                .recover_chunk(chunk, u64::from(offset), u64::from(len), index)
                .await
        }
        ChunkOp::Flatten { chunk } => engine.flatten_chunk(chunk, index).await,
        ChunkOp::VolumeCreate {
            table,
            copyset: data_copyset,
            size,
            name,
        } => {
            let data_copyset = CopysetId(data_copyset);
            create_volume(engine, copyset, table, &name, size, data_copyset, index).await
        }
        ChunkOp::VolumeDelete { table, name } => {
            delete_volume(engine, copyset, table, &name, index).await
        }
        ChunkOp::Meta(op) => super::apply_meta::apply_meta(engine, copyset, op, index).await,
        // The sums are taken (and kept) by the caller, which answers with them.
        ChunkOp::Scrub { chunk, offset, len } => {
            super::scrub::apply_scrub(engine, copyset, (chunk, offset, len), index)
                .await
                .map(|_| ())
        }
        ChunkOp::Repair {
            chunk,
            offset,
            data,
            bad,
        } => super::scrub::apply_repair(engine, copyset, (chunk, offset, data), bad, index)
            .await
            .map(|_| ()),
    }
}

/// Adds the record of the volume `name` of `size` bytes, its data in `data_copyset`, to the
/// volume table in chunk `table` of `copyset`.
async fn create_volume<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    table: ChunkId,
    name: &str,
    size: u64,
    data_copyset: CopysetId,
    index: LogIndex,
) -> Result<(), StorageError> {
    let content = read_whole_chunk(engine, table).await?;
    let chunk_size = engine.layout().geometry.chunk_size;
    let planned = crate::volume_table::plan_create(&content, name, size, data_copyset, chunk_size);
    let (record_index, record) = planned.map_err(|e| StorageError::Conflict {
        chunk: table,
        reason: e.to_string(),
    })?;
    let offset = (record_index * crate::volume_table::RECORD_LEN) as u64;
    let bytes = Bytes::from(record.encode());
    engine
        .write_chunk_bytes(copyset, table, offset, bytes, 1, index)
        .await
}

/// Zeroes the record of the volume `name` in the volume table in chunk `table` of `copyset`.
async fn delete_volume<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    table: ChunkId,
    name: &str,
    index: LogIndex,
) -> Result<(), StorageError> {
    let content = read_whole_chunk(engine, table).await?;
    let (record_index, _) =
        crate::volume_table::plan_delete(&content, name).map_err(|e| StorageError::Conflict {
            chunk: table,
            reason: e.to_string(),
        })?;
    let offset = (record_index * crate::volume_table::RECORD_LEN) as u64;
    let zeroes = Bytes::from(vec![0u8; crate::volume_table::RECORD_LEN]);
    engine
        .write_chunk_bytes(copyset, table, offset, zeroes, 1, index)
        .await
}

/// A whole chunk's bytes; zeroes when it does not exist.
pub(super) async fn read_whole_chunk<B: Bdev>(
    engine: &ShardEngine<B>,
    chunk: ChunkId,
) -> Result<Vec<u8>, StorageError> {
    let chunk_size = engine.layout().geometry.chunk_size;
    match engine.read_chunk(chunk, 0, chunk_size).await {
        Ok(buffer) => Ok(buffer.as_slice().to_vec()),
        Err(StorageError::ChunkNotFound(_)) => Ok(vec![0u8; chunk_size as usize]),
        Err(error) => Err(error),
    }
}
