//! Volumes: a named, sized run of chunks addressed by byte offset, either all in one copyset
//! or striped in segments over the pool's copysets ([`pool`]), a segment's copysets allocated
//! on its first write. I/O that crosses chunk boundaries is split into one request per chunk,
//! sent in parallel and completed as one (Curve's IOSplitor); writes that do not cover whole
//! pages read the pages around them first.
//!
//! A volume is what the NBD export serves: every write it acknowledges has been replicated and
//! applied by the copyset, so FLUSH and FUA have nothing left to do.

use crate::client::{Client, ClientError};
use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::protocol::Status;
use crate::volume_table::{
    self, TableError, VolumeLayout, VolumeRecord, METADATA_COPYSET, TABLE_CHUNK,
};

mod io;
pub mod pool;
pub mod snapshot;

pub use io::Volume;

/// A volume as the NBD export and the client library open it: its table record.
pub type VolumeSpec = VolumeRecord;

/// Why a volume-table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The cluster did not do it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The table refused it.
    #[error(transparent)]
    Table(#[from] TableError),
}

/// The nodes that hold a copyset created for volumes: the first three of the cluster by id.
pub fn default_peers(nodes: &[u64]) -> Vec<u64> {
    let mut peers = nodes.to_vec();
    peers.sort_unstable();
    peers.truncate(3);
    peers
}

/// Creates the metadata copyset (which holds the volume table) on `peers` if missing.
pub async fn ensure_metadata_copyset(client: &Client, peers: &[u64]) -> Result<(), ClientError> {
    client.create_copyset(METADATA_COPYSET, peers).await
}

/// The volume table's bytes, read linearizably from the metadata copyset's leader; empty when
/// no volume was ever created.
async fn read_table(client: &Client) -> Result<Vec<u8>, ClientError> {
    let size = match client.chunk_size(METADATA_COPYSET, TABLE_CHUNK).await {
        Ok(Some(size)) => size,
        Ok(None)
        | Err(ClientError::Refused {
            status: Status::CopysetNotFound,
            ..
        }) => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut table = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = MAX_PIECE.min(size - offset);
        let bytes = client
            .read(METADATA_COPYSET, TABLE_CHUNK, offset, len as u32)
            .await?;
        table.extend_from_slice(&bytes);
        offset += len;
    }
    Ok(table)
}

/// Every volume in the table.
pub async fn list_volumes(client: &Client) -> Result<Vec<VolumeRecord>, VolumeError> {
    let table = read_table(client).await?;
    Ok(volume_table::list(&table)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The volume named `name`.
pub async fn find_volume(client: &Client, name: &str) -> Result<VolumeRecord, VolumeError> {
    let table = read_table(client).await?;
    Ok(volume_table::find(&table, name)?)
}

/// Checks a new volume's name: the table's rules, and no `@` (`VOLUME@SNAPSHOT` names a
/// snapshot). Checked by the client only: the table's own check is part of applying its
/// entries, which must decide as they always did for entries already in a log.
pub fn check_new_name(name: &str) -> Result<(), VolumeError> {
    volume_table::check_name(name)?;
    if name.contains('@') {
        return Err(TableError::Invalid(format!(
            "volume name {name:?} has an '@' (VOLUME@SNAPSHOT names a snapshot)"
        ))
        .into());
    }
    Ok(())
}

/// Adds a volume to the table (the metadata copyset must exist: [`ensure_metadata_copyset`]);
/// its chunks are laid out by the table. Refused when the name exists.
pub async fn create_volume(
    client: &Client,
    name: &str,
    size: u64,
    copyset: CopysetId,
) -> Result<VolumeRecord, VolumeError> {
    check_new_name(name)?;
    let op = ChunkOp::VolumeCreate {
        table: TABLE_CHUNK,
        copyset: copyset.0,
        size,
        name: name.to_string(),
    };
    match client.apply(METADATA_COPYSET, &op).await {
        Ok(()) => {}
        Err(ClientError::Refused {
            status: Status::Invalid(reason),
            ..
        }) if reason.contains("exists already") => {
            return Err(TableError::Exists(name.to_string()).into())
        }
        Err(error) => return Err(error.into()),
    }
    find_volume(client, name).await
}

/// Deletes a volume: its chunks first (so a crash halfway leaves the volume listed, to
/// delete again, rather than chunks nobody owns), then its table entry.
pub async fn delete_volume(client: &Client, name: &str) -> Result<VolumeRecord, VolumeError> {
    let volume = find_volume(client, name).await?;
    match volume.layout {
        VolumeLayout::Single {
            copyset,
            first_chunk,
        } => {
            for i in 0..volume.chunks() {
                client
                    .delete(copyset, ChunkId(first_chunk.0 + i), 0)
                    .await?;
            }
        }
        VolumeLayout::Striped { id, segment_size } => {
            let snapshots = snapshot::read_table(client, id).await?;
            if let Some(first) = snapshots.snapshots.first() {
                return Err(TableError::Invalid(format!(
                    "volume {name} has snapshot {:?}: delete its snapshots first",
                    first.name
                ))
                .into());
            }
            let per_segment = segment_size / volume.chunk_size.max(1);
            for segment in 0..volume.segments() {
                let Some(record) = pool::read_segment(client, id, segment).await? else {
                    continue;
                };
                for (i, copyset) in record.copysets.iter().enumerate() {
                    let index = segment * per_segment + i as u64;
                    let chunk = crate::placement::chunk_id(id, index)
                        .map_err(|e| TableError::Corrupt(e.to_string()))?;
                    client.delete(*copyset, chunk, 0).await?;
                }
            }
            let table = crate::placement::tables::segment_table_chunk(id);
            client.delete(METADATA_COPYSET, table, 0).await?;
            let snapshots = crate::placement::snapshots::snapshot_table_chunk(id);
            match client.delete(METADATA_COPYSET, snapshots, 0).await {
                Ok(())
                | Err(ClientError::Refused {
                    status: crate::protocol::Status::ChunkNotFound,
                    ..
                }) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    let op = ChunkOp::VolumeDelete {
        table: TABLE_CHUNK,
        name: name.to_string(),
    };
    client.apply(METADATA_COPYSET, &op).await?;
    Ok(volume)
}

/// The page size I/O is aligned to on the chunkservers.
pub const PAGE: u64 = 4096;
/// The largest request one chunk request carries.
const MAX_PIECE: u64 = 1 << 20;

/// A boxed future of this task.
pub(crate) type LocalFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Runs the futures concurrently on this task and returns their outputs in order.
pub(crate) async fn join_all<T>(futures: Vec<LocalFuture<'_, T>>) -> Vec<T> {
    let mut pending: Vec<Option<LocalFuture<'_, T>>> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
