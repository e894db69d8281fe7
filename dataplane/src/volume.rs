//! Volumes: a named, sized run of chunks in one copyset, addressed by byte offset. I/O that
//! crosses chunk boundaries is split into one request per chunk and completed as one (Curve's
//! IOSplitor); writes that do not cover whole pages read the pages around them first.
//!
//! A volume is what the NBD export serves: every write it acknowledges has been replicated and
//! applied by the copyset, so FLUSH and FUA have nothing left to do.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use glommio::sync::Semaphore;

use crate::client::{Client, ClientError};
use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::nbd::{Export, ExportError, ExportFuture};
use crate::protocol::Status;
use crate::volume_table::{self, TableError, VolumeRecord, METADATA_COPYSET, TABLE_CHUNK};

/// Where a volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Its name (the NBD export name).
    pub name: String,
    /// The copyset holding its chunks.
    pub copyset: CopysetId,
    /// Size in bytes; a multiple of the page size.
    pub size: u64,
    /// The cluster's chunk size.
    pub chunk_size: u64,
    /// Id of its first chunk; chunk `first_chunk + i` holds bytes `[i * chunk_size, …)`.
    pub first_chunk: u64,
}

impl From<VolumeRecord> for VolumeSpec {
    fn from(record: VolumeRecord) -> VolumeSpec {
        VolumeSpec {
            name: record.name,
            copyset: record.copyset,
            size: record.size,
            chunk_size: record.chunk_size,
            first_chunk: record.first_chunk.0,
        }
    }
}

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

/// Adds a volume to the table (the metadata copyset must exist: [`ensure_metadata_copyset`]);
/// its chunks are laid out by the table. Refused when the name exists.
pub async fn create_volume(
    client: &Client,
    name: &str,
    size: u64,
    copyset: CopysetId,
) -> Result<VolumeRecord, VolumeError> {
    volume_table::check_name(name)?;
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
    for i in 0..volume.chunks() {
        client
            .delete(volume.copyset, ChunkId(volume.first_chunk.0 + i), 0)
            .await?;
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

/// A volume, served through a cluster client.
pub struct Volume {
    spec: VolumeSpec,
    client: Rc<Client>,
    /// Serializes read-modify-write of partial pages, so two unaligned writes sharing a page
    /// cannot lose one another's bytes. Aligned writes do not take it.
    partial: Semaphore,
    /// When a failed request was last logged, and how many were not logged since.
    logged: std::cell::Cell<(Option<std::time::Instant>, u64)>,
}

/// At most one failed request is logged per this interval (the others are counted).
const ERROR_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Volume {
    /// A volume over `client`.
    pub fn new(spec: VolumeSpec, client: Rc<Client>) -> Volume {
        Volume {
            spec,
            client,
            partial: Semaphore::new(1),
            logged: std::cell::Cell::new((None, 0)),
        }
    }

    /// A request to the cluster failed after the client's retries (its deadline passed, or
    /// the copyset refused it): the error the export answers with (EIO), logged at most once a
    /// second with the volume, the operation, where, the copyset and the cause.
    fn failed(&self, op: &str, offset: u64, chunk: ChunkId, error: ClientError) -> ExportError {
        let now = std::time::Instant::now();
        let (last, suppressed) = self.logged.get();
        if last.is_some_and(|at| now.duration_since(at) < ERROR_LOG_INTERVAL) {
            self.logged.set((last, suppressed + 1));
        } else {
            self.logged.set((Some(now), 0));
            tracing::warn!(
                volume = %self.spec.name,
                op,
                offset,
                copyset = %self.spec.copyset,
                chunk = chunk.0,
                cause = %error,
                suppressed,
                "volume request failed; the client answers an I/O error"
            );
        }
        ExportError::Io(format!(
            "{op} of volume {} at {offset} (copyset {}, chunk {}): {error}",
            self.spec.name, self.spec.copyset, chunk.0
        ))
    }

    /// Its description.
    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.spec.size => Ok(()),
            _ => Err(ExportError::OutOfRange {
                offset,
                len,
                size: self.spec.size,
            }),
        }
    }

    /// Pieces of `[offset, offset + len)` that each stay within one chunk and `MAX_PIECE`:
    /// (volume offset, chunk, offset in chunk, length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, ChunkId, u64, u64)> {
        let mut pieces = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let chunk_index = at / self.spec.chunk_size;
            let within = at % self.spec.chunk_size;
            let piece = (self.spec.chunk_size - within).min(end - at).min(MAX_PIECE);
            pieces.push((
                at,
                ChunkId(self.spec.first_chunk + chunk_index),
                within,
                piece,
            ));
            at += piece;
        }
        pieces
    }

    async fn read_bytes(&self, offset: u64, len: u64) -> Result<Bytes, ExportError> {
        self.check(offset, len)?;
        let mut out = BytesMut::with_capacity(len as usize);
        for (at, chunk, within, piece) in self.pieces(offset, len) {
            // The chunkservers read whole pages: widen, then cut.
            let start = within / PAGE * PAGE;
            let end = (within + piece).div_ceil(PAGE) * PAGE;
            let data = self
                .client
                .read(self.spec.copyset, chunk, start, (end - start) as u32)
                .await
                .map_err(|e| self.failed("read", at, chunk, e))?;
            let from = (within - start) as usize;
            let slice = data
                .get(from..from + piece as usize)
                .ok_or_else(|| ExportError::Io("a chunk read returned too few bytes".into()))?;
            out.extend_from_slice(slice);
        }
        Ok(out.freeze())
    }

    async fn write_bytes(&self, offset: u64, data: Bytes) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        for (at, chunk, within, piece) in self.pieces(offset, data.len() as u64) {
            let part = data.slice((at - offset) as usize..(at - offset + piece) as usize);
            if within % PAGE == 0 && piece % PAGE == 0 {
                self.write_piece(at, chunk, within, part).await?;
                continue;
            }
            let _serialized = self
                .partial
                .acquire_permit(1)
                .await
                .map_err(|e| ExportError::Io(e.to_string()))?;
            let start = within / PAGE * PAGE;
            let end = (within + piece).div_ceil(PAGE) * PAGE;
            let current = self
                .client
                .read(self.spec.copyset, chunk, start, (end - start) as u32)
                .await
                .map_err(|e| self.failed("read before a partial write", at, chunk, e))?;
            let mut merged = BytesMut::from(&current[..]);
            if merged.len() != (end - start) as usize {
                return Err(ExportError::Io(
                    "a chunk read returned too few bytes".into(),
                ));
            }
            let from = (within - start) as usize;
            merged[from..from + piece as usize].copy_from_slice(&part);
            self.write_piece(at, chunk, start, merged.freeze()).await?;
        }
        Ok(())
    }

    async fn write_piece(
        &self,
        at: u64,
        chunk: ChunkId,
        within: u64,
        data: Bytes,
    ) -> Result<(), ExportError> {
        self.client
            .write(self.spec.copyset, chunk, within as u32, data, 1)
            .await
            .map_err(|e| self.failed("write", at, chunk, e))
    }

    async fn zero(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        let mut at = offset;
        while at < offset + len {
            let piece = (offset + len - at).min(MAX_PIECE);
            self.write_bytes(at, Bytes::from(vec![0u8; piece as usize]))
                .await?;
            at += piece;
        }
        Ok(())
    }
}

impl Export for Volume {
    fn size(&self) -> u64 {
        self.spec.size
    }

    fn block_sizes(&self) -> (u32, u32, u32) {
        (512, PAGE as u32, 32 << 20)
    }

    fn read(&self, offset: u64, len: u32) -> ExportFuture<'_, Bytes> {
        Box::pin(self.read_bytes(offset, u64::from(len)))
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> ExportFuture<'_, ()> {
        // Acknowledged writes are replicated and applied already: FUA holds without more work.
        Box::pin(self.write_bytes(offset, data))
    }

    fn flush(&self) -> ExportFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u32) -> ExportFuture<'_, ()> {
        Box::pin(self.zero(offset, u64::from(len)))
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> ExportFuture<'_, ()> {
        Box::pin(self.zero(offset, u64::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;

    #[test]
    fn requests_split_at_chunk_boundaries_and_the_piece_limit() {
        let spec = VolumeSpec {
            name: "v".into(),
            copyset: CopysetId(1),
            size: 8 << 20,
            chunk_size: 2 << 20,
            first_chunk: 100,
        };
        let volume = Volume::new(spec, Rc::new(Client::new(&[], ClientConfig::default())));
        let pieces = volume.pieces((2 << 20) - 4096, 8192);
        assert_eq!(
            pieces,
            vec![
                (2093056, ChunkId(100), 2093056, 4096),
                (2097152, ChunkId(101), 0, 4096)
            ]
        );
        let pieces = volume.pieces(0, 3 << 20);
        assert_eq!(pieces.len(), 3, "1 MiB pieces");
        assert!(pieces.iter().all(|p| p.3 == 1 << 20));
        assert!(volume.check((8 << 20) - 1, 2).is_err());
    }
}
