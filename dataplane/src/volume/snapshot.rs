//! Volume snapshots from the client's side (issue 21): create, list, delete and roll back,
//! over the snapshot table (`placement::snapshots`, raft entries of the metadata copyset) and
//! the chunk layer's copy-on-write by sequence number.
//!
//! **Create**: one entry records the snapshot at the volume's epoch `e` and raises the epoch
//! to `e + 1` (writes after it carry the new number; the chunk layer copies a page's old
//! version on its first write). Then every chunk of the volume's allocated segments is
//! *fenced* at `e + 1` (`ChunkOp::Fence`: its current version becomes its snapshot at `e`,
//! and a write of `e` — a client that has not seen the new epoch yet — is refused with
//! `BackwardSn`, on which the client re-reads the epoch and writes again). Which chunks
//! existed at their fence is recorded last (`SnapshotChunks`): the snapshot is ready, and a
//! chunk outside that bitmap reads as zeros in it, whatever a late writer of `e` created.
//! **Delete**: the snapshot is marked, every chunk's old version dropped
//! (`DeleteSnapshotOrCorrectSn`, harmless twice), and the record removed — a deletion that
//! stopped half-way is finished by running it again. **Rollback** copies the snapshot's
//! version of every chunk over the current one (zeros where a chunk did not exist), writing
//! at the current epoch: stop the volume's exports first, or their writes mix in.

use std::rc::Rc;

use bytes::Bytes;

use super::{find_volume, pool, VolumeError, VolumeRecord, MAX_PIECE};
use crate::client::{Client, ClientError};
use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::placement::meta::MetaOp;
use crate::placement::snapshots::{self, Snapshot, SnapshotState, SnapshotTable};
use crate::protocol::Status;
use crate::volume_table::{TableError, VolumeLayout, METADATA_COPYSET};

/// A snapshot as a person sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The sequence number of the chunk versions it is.
    pub seq: u64,
    /// When it was created, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Creating, ready or deleting.
    pub state: SnapshotState,
    /// Chunks of the volume that existed when it was taken (once ready).
    pub chunks: Option<u64>,
}

/// How many chunk operations a pass over a volume keeps in flight.
const IN_FLIGHT: usize = 32;

/// The id and segment size of striped volume `record`, or the refusal for a volume of one
/// copyset.
fn striped(record: &VolumeRecord) -> Result<(u64, u64), VolumeError> {
    match record.layout {
        VolumeLayout::Striped { id, segment_size } => Ok((id, segment_size)),
        VolumeLayout::Single { .. } => Err(TableError::Invalid(format!(
            "volume {} lives on one copyset (created with --copyset); snapshots are for \
             volumes striped over the pool",
            record.name
        ))
        .into()),
    }
}

/// The id of striped volume `record` ([`striped`]).
fn striped_id(record: &VolumeRecord) -> Result<u64, VolumeError> {
    striped(record).map(|(id, _)| id)
}

/// Volume `volume`'s snapshot table.
pub async fn read_table(client: &Client, volume: u64) -> Result<SnapshotTable, VolumeError> {
    let chunk = snapshots::snapshot_table_chunk(volume);
    let page = match client
        .read(METADATA_COPYSET, chunk, 0, snapshots::HEADER_LEN as u32)
        .await
    {
        Ok(page) => page,
        Err(ClientError::Refused {
            status: Status::ChunkNotFound,
            ..
        }) => return Ok(SnapshotTable::default()),
        Err(error) => return Err(error.into()),
    };
    SnapshotTable::decode(&page).map_err(|e| TableError::Corrupt(e.to_string()).into())
}

/// The bitmap of `snapshot` of volume `volume`: `None` while it is being created.
pub async fn read_bitmap(
    client: &Client,
    volume: u64,
    snapshot: &Snapshot,
) -> Result<Option<Vec<bool>>, VolumeError> {
    let chunk = snapshots::snapshot_table_chunk(volume);
    let region = match client
        .read(
            METADATA_COPYSET,
            chunk,
            snapshots::bitmap_offset(snapshot.slot),
            snapshots::BITMAP_REGION as u32,
        )
        .await
    {
        Ok(region) => region,
        Err(ClientError::Refused {
            status: Status::ChunkNotFound,
            ..
        }) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    snapshots::decode_bitmap(&region, snapshot.seq)
        .map_err(|e| TableError::Corrupt(e.to_string()).into())
}

/// Volume `name` and its snapshots.
pub async fn list_snapshots(
    client: &Client,
    name: &str,
) -> Result<(VolumeRecord, Vec<SnapshotInfo>), VolumeError> {
    let record = find_volume(client, name).await?;
    let id = striped_id(&record)?;
    let table = read_table(client, id).await?;
    let mut out = Vec::new();
    for snapshot in &table.snapshots {
        let bitmap = read_bitmap(client, id, snapshot).await?;
        let state = match (&bitmap, snapshot.deleting) {
            (_, true) => SnapshotState::Deleting,
            (Some(_), false) => SnapshotState::Ready,
            (None, false) => SnapshotState::Creating,
        };
        out.push(SnapshotInfo {
            name: snapshot.name.clone(),
            seq: snapshot.seq,
            created_ms: snapshot.created_ms,
            state,
            chunks: bitmap.map(|b| b.iter().filter(|e| **e).count() as u64),
        });
    }
    Ok((record, out))
}

/// Every chunk of the volume's allocated segments: (index in the volume, copyset, chunk).
async fn allocated_chunks(
    client: &Client,
    record: &VolumeRecord,
) -> Result<Vec<(u64, CopysetId, ChunkId)>, VolumeError> {
    let (id, segment_size) = striped(record)?;
    let per_segment = segment_size / record.chunk_size.max(1);
    let mut chunks = Vec::new();
    for segment in 0..record.segments() {
        let Some(found) = pool::read_segment(client, id, segment).await? else {
            continue;
        };
        for (i, copyset) in found.copysets.iter().enumerate() {
            let index = segment * per_segment + i as u64;
            if index >= record.chunks() {
                break;
            }
            let chunk = crate::placement::chunk_id(id, index)
                .map_err(|e| TableError::Invalid(e.to_string()))?;
            chunks.push((index, *copyset, chunk));
        }
    }
    Ok(chunks)
}

/// Hears (items done, items in all) as a pass over a volume's chunks goes on.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Runs `op` for each item, `IN_FLIGHT` at a time, telling `progress` after each batch; the
/// first error ends it.
async fn for_each<T, F, Fut>(items: &[T], progress: Progress<'_>, op: F) -> Result<(), VolumeError>
where
    F: Fn(&T) -> Fut,
    Fut: std::future::Future<Output = Result<(), VolumeError>>,
{
    let total = items.len() as u64;
    let mut done = 0;
    progress(0, total);
    for batch in items.chunks(IN_FLIGHT) {
        let futures: Vec<super::LocalFuture<'_, _>> = batch
            .iter()
            .map(|item| Box::pin(op(item)) as super::LocalFuture<'_, _>)
            .collect();
        for result in super::join_all(futures).await {
            result?;
        }
        done += batch.len() as u64;
        progress(done, total);
    }
    Ok(())
}

/// Creates snapshot `name` of volume `volume_name` (see the module's text); gives it once
/// ready. I/O to the volume goes on meanwhile.
pub async fn create_snapshot(
    client: &Client,
    volume_name: &str,
    name: &str,
    created_ms: u64,
    progress: Progress<'_>,
) -> Result<SnapshotInfo, VolumeError> {
    snapshots::check_snapshot_name(name).map_err(|e| TableError::Invalid(e.to_string()))?;
    let record = find_volume(client, volume_name).await?;
    let id = striped_id(&record)?;
    pool::apply_meta(
        client,
        MetaOp::SnapshotCreate {
            volume: id,
            name: name.to_string(),
            created_ms,
        },
    )
    .await?;
    let table = read_table(client, id).await?;
    let snapshot = table
        .find(name)
        .cloned()
        .ok_or_else(|| TableError::Corrupt(format!("snapshot {name} was created but is gone")))?;
    let fence = snapshot.seq + 1;
    let chunks = allocated_chunks(client, &record).await?;
    let existed: Rc<std::cell::RefCell<Vec<bool>>> = Rc::new(std::cell::RefCell::new(vec![
            false;
            record.chunks() as usize
        ]));
    for_each(&chunks, progress, |&(index, copyset, chunk)| {
        let existed = Rc::clone(&existed);
        async move {
            client
                .apply(copyset, &ChunkOp::Fence { chunk, sn: fence })
                .await?;
            // Fenced chunks carry the new number; one created after its fence by a writer of
            // the old epoch carries the old one and is not part of the snapshot.
            let versions = client.chunk_versions(copyset, chunk).await?;
            if versions.is_some_and(|(sn, _)| sn >= fence) {
                if let Some(bit) = existed.borrow_mut().get_mut(index as usize) {
                    *bit = true;
                }
            }
            Ok(())
        }
    })
    .await?;
    let existed = existed.borrow().clone();
    let count = existed.iter().filter(|e| **e).count() as u64;
    pool::apply_meta(
        client,
        MetaOp::SnapshotChunks {
            volume: id,
            seq: snapshot.seq,
            existed,
        },
    )
    .await?;
    Ok(SnapshotInfo {
        name: snapshot.name,
        seq: snapshot.seq,
        created_ms: snapshot.created_ms,
        state: SnapshotState::Ready,
        chunks: Some(count),
    })
}

/// Deletes snapshot `name` of volume `volume_name`: marked, every chunk's old version
/// dropped, the record removed. Running it again finishes a deletion that stopped.
pub async fn delete_snapshot(
    client: &Client,
    volume_name: &str,
    name: &str,
    progress: Progress<'_>,
) -> Result<(), VolumeError> {
    let record = find_volume(client, volume_name).await?;
    let id = striped_id(&record)?;
    pool::apply_meta(
        client,
        MetaOp::SnapshotDeleting {
            volume: id,
            name: name.to_string(),
        },
    )
    .await?;
    let epoch = read_table(client, id).await?.epoch;
    let chunks = allocated_chunks(client, &record).await?;
    for_each(&chunks, progress, |&(_, copyset, chunk)| async move {
        let op = ChunkOp::DeleteSnapshotOrCorrectSn { chunk, sn: epoch };
        match client.apply(copyset, &op).await {
            Ok(())
            | Err(ClientError::Refused {
                status: Status::ChunkNotFound,
                ..
            }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    })
    .await?;
    pool::apply_meta(
        client,
        MetaOp::SnapshotDrop {
            volume: id,
            name: name.to_string(),
        },
    )
    .await
}

/// A ready snapshot's view: its sequence number and which chunks it holds.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    /// The snapshot's name.
    pub name: String,
    /// Its sequence number.
    pub seq: u64,
    /// Bit `i`: chunk `i` is in the snapshot (else it reads as zeros).
    pub existed: Vec<bool>,
}

/// The view of ready snapshot `name` of `record`.
pub async fn snapshot_view(
    client: &Client,
    record: &VolumeRecord,
    name: &str,
) -> Result<SnapshotView, VolumeError> {
    let id = striped_id(record)?;
    let table = read_table(client, id).await?;
    let snapshot = table.find(name).ok_or_else(|| {
        TableError::Invalid(format!(
            "volume {} has no snapshot named {name:?}",
            record.name
        ))
    })?;
    if snapshot.deleting {
        return Err(TableError::Invalid(format!("snapshot {name:?} is being deleted")).into());
    }
    let existed = read_bitmap(client, id, snapshot).await?.ok_or_else(|| {
        TableError::Invalid(format!(
            "snapshot {name:?} is still being created (or its creation stopped: delete it)"
        ))
    })?;
    Ok(SnapshotView {
        name: name.to_string(),
        seq: snapshot.seq,
        existed,
    })
}

/// Reads `len` bytes at `offset` of `chunk`'s version at `seq`: the chunk's snapshot, or the
/// chunk itself when not written since. A chunk whose old version carries an older number
/// (its sequence number was corrected after an earlier snapshot's deletion) is read at that
/// number: it is the version current at `seq`.
pub async fn read_version(
    client: &Client,
    copyset: CopysetId,
    chunk: ChunkId,
    seq: u64,
    offset: u64,
    len: u32,
) -> Result<Bytes, ClientError> {
    match client.read_snapshot(copyset, chunk, seq, offset, len).await {
        Err(ClientError::Refused {
            status: Status::Invalid(reason),
            op,
            copyset: c,
        }) if reason.contains("has no snapshot with sn") => {
            match client.chunk_versions(copyset, chunk).await? {
                Some((_, Some(older))) if older < seq => {
                    client
                        .read_snapshot(copyset, chunk, older, offset, len)
                        .await
                }
                _ => Err(ClientError::Refused {
                    status: Status::Invalid(reason),
                    op,
                    copyset: c,
                }),
            }
        }
        other => other,
    }
}

/// Rolls volume `volume_name` back to snapshot `name`: every chunk of the volume takes the
/// snapshot's version (zeros where the snapshot has none). Gives the chunks rewritten. The
/// volume's exports should be stopped: a write of theirs during the rollback is kept or
/// overwritten, chunk by chunk.
pub async fn rollback(
    client: &Client,
    volume_name: &str,
    name: &str,
    progress: Progress<'_>,
) -> Result<u64, VolumeError> {
    let record = find_volume(client, volume_name).await?;
    let id = striped_id(&record)?;
    let view = snapshot_view(client, &record, name).await?;
    let epoch = read_table(client, id).await?.epoch;
    let chunks = allocated_chunks(client, &record).await?;
    let chunk_size = record.chunk_size;
    for_each(&chunks, progress, |&(index, copyset, chunk)| {
        let held = view.existed.get(index as usize).copied().unwrap_or(false);
        let seq = view.seq;
        async move {
            if !held {
                return match client.delete(copyset, chunk, epoch).await {
                    Ok(())
                    | Err(ClientError::Refused {
                        status: Status::ChunkNotFound,
                        ..
                    }) => Ok(()),
                    Err(error) => Err(error.into()),
                };
            }
            let mut at = 0;
            while at < chunk_size {
                let len = MAX_PIECE.min(chunk_size - at);
                let data = read_version(client, copyset, chunk, seq, at, len as u32).await?;
                client.write(copyset, chunk, at as u32, data, epoch).await?;
                at += len;
            }
            Ok(())
        }
    })
    .await?;
    Ok(chunks.len() as u64)
}

/// Copies ready snapshot `snapshot` of volume `source` into a new striped volume `name` of
/// the same size and segment size (an eager clone: every chunk the snapshot holds is read at
/// its version and written to the new volume, all-zero pieces skipped; nothing refers to the
/// snapshot afterwards, so it can be deleted). `progress` hears (chunks copied, chunks to
/// copy) after each chunk. Refused, creating nothing, when `name` is taken or the snapshot is
/// not ready. A clone that stopped half-way (the client died) is incomplete: delete it and
/// clone again.
pub async fn clone_snapshot(
    client: &Rc<Client>,
    source: &str,
    snapshot: &str,
    name: &str,
    progress: Progress<'_>,
) -> Result<VolumeRecord, VolumeError> {
    super::check_new_name(name)?;
    match find_volume(client, name).await {
        Ok(_) => return Err(TableError::Exists(name.to_string()).into()),
        Err(VolumeError::Table(TableError::NotFound(_))) => {}
        Err(error) => return Err(error),
    }
    let record = find_volume(client, source).await?;
    let (_, segment_size) = striped(&record)?;
    let view = snapshot_view(client, &record, snapshot).await?;
    let chunks: Vec<_> = allocated_chunks(client, &record)
        .await?
        .into_iter()
        .filter(|(index, _, _)| view.existed.get(*index as usize).copied().unwrap_or(false))
        .collect();
    let created = pool::create_striped_volume(client, name, record.size, segment_size).await?;
    let target = super::Volume::new(created.clone(), Rc::clone(client));
    let chunk_size = record.chunk_size;
    for_each(&chunks, progress, |&(index, copyset, chunk)| {
        let (target, seq) = (&target, view.seq);
        async move {
            let mut at = 0;
            while at < chunk_size {
                let len = MAX_PIECE.min(chunk_size - at);
                let data = read_version(client, copyset, chunk, seq, at, len as u32).await?;
                if data.iter().any(|b| *b != 0) {
                    crate::nbd::Export::write(target, index * chunk_size + at, data, false)
                        .await
                        .map_err(|e| TableError::Invalid(format!("writing the clone: {e}")))?;
                }
                at += len;
            }
            Ok(())
        }
    })
    .await?;
    Ok(created)
}
