//! A volume's I/O: requests split at chunk boundaries (and at the piece limit), each piece
//! routed to its chunk's copyset — the volume's one copyset, or for a striped volume the
//! copyset its segment's record names, fetched once and cached (and allocated on the
//! segment's first write) — and the pieces sent in parallel.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use glommio::sync::Semaphore;

use super::snapshot::{self, SnapshotView};
use super::{join_all, pool, LocalFuture, VolumeError, VolumeSpec, MAX_PIECE, PAGE};
use crate::client::{Client, ClientError};
use crate::ids::{ChunkId, CopysetId};
use crate::nbd::{Export, ExportError, ExportFuture};
use crate::placement::tables::SegmentRecord;
use crate::volume_table::VolumeLayout;

/// A volume, served through a cluster client.
pub struct Volume {
    spec: VolumeSpec,
    client: Rc<Client>,
    /// Serializes read-modify-write of partial pages, so two unaligned writes sharing a page
    /// cannot lose one another's bytes. Aligned writes do not take it.
    partial: Semaphore,
    /// A striped volume's allocated segments, as their records say.
    segments: RefCell<HashMap<u64, Rc<SegmentRecord>>>,
    /// One segment allocation at a time: writes racing to a new segment wait for the first
    /// one's allocation instead of each proposing their own.
    allocating: Semaphore,
    /// When a failed request was last logged, and how many were not logged since.
    logged: std::cell::Cell<(Option<std::time::Instant>, u64)>,
    /// The sequence number writes carry (a striped volume's epoch, raised by a snapshot), and
    /// when it was last read from the snapshot table.
    epoch: std::cell::Cell<(u64, Option<std::time::Instant>)>,
    /// A snapshot this volume shows, read-only, instead of its current data.
    view: Option<SnapshotView>,
    /// Where the export's requests are counted (`chunkserver nbd --metrics`), if anywhere.
    metrics: Option<Rc<crate::metrics::Registry>>,
}

/// How long a write trusts the epoch it read before reading it again (a writer that missed a
/// snapshot learns of it at the latest then, or at once from a fenced chunk's refusal).
const EPOCH_FRESH: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a write waits for the periodic look at the epoch.
const EPOCH_READ_BUDGET: std::time::Duration = std::time::Duration::from_millis(100);

/// At most one failed request is logged per this interval (the others are counted).
const ERROR_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A piece of a request: (volume offset, chunk index in the volume, offset in the chunk,
/// length).
type Piece = (u64, u64, u64, u64);

/// Where a piece goes: its copyset and chunk, or nowhere for a segment never written.
type Route = Option<(CopysetId, ChunkId)>;

impl Volume {
    /// A volume over `client`.
    pub fn new(spec: VolumeSpec, client: Rc<Client>) -> Volume {
        Volume {
            spec,
            client,
            partial: Semaphore::new(1),
            segments: RefCell::new(HashMap::new()),
            allocating: Semaphore::new(1),
            logged: std::cell::Cell::new((None, 0)),
            epoch: std::cell::Cell::new((1, None)),
            view: None,
            metrics: None,
        }
    }

    /// Counts the export's requests in `registry`: `chunkserver_nbd_requests_total` by
    /// volume, operation and result (`ok`, `error`).
    pub fn count_in(mut self, registry: Rc<crate::metrics::Registry>) -> Volume {
        self.metrics = Some(registry);
        self
    }

    /// Counts one answered request.
    fn counted<T>(&self, op: &str, result: Result<T, ExportError>) -> Result<T, ExportError> {
        if let Some(registry) = &self.metrics {
            let name = self.export_name();
            let outcome = if result.is_ok() { "ok" } else { "error" };
            registry
                .counter(
                    "chunkserver_nbd_requests_total",
                    "NBD requests answered, by volume, operation and result",
                    &[("volume", &name), ("op", op), ("result", outcome)],
                )
                .inc();
        }
        result
    }

    /// The export's name: the volume's, or `VOLUME@SNAPSHOT`.
    fn export_name(&self) -> String {
        match &self.view {
            Some(view) => format!("{}@{}", self.spec.name, view.name),
            None => self.spec.name.clone(),
        }
    }

    /// Snapshot `view` of the volume `spec` describes, read-only.
    pub fn of_snapshot(spec: VolumeSpec, client: Rc<Client>, view: SnapshotView) -> Volume {
        Volume {
            view: Some(view),
            ..Volume::new(spec, client)
        }
    }

    /// The sequence number for a write: a striped volume's epoch, read again when older than
    /// [`EPOCH_FRESH`] or when `stale` (a chunk refused the last one as older than its own).
    async fn write_epoch(&self, stale: bool) -> Result<u64, ExportError> {
        let VolumeLayout::Striped { id, .. } = self.spec.layout else {
            return Ok(1);
        };
        let (epoch, read_at) = self.epoch.get();
        let now = std::time::Instant::now();
        if !stale && read_at.is_some_and(|at| now.duration_since(at) < EPOCH_FRESH) {
            return Ok(epoch);
        }
        let read = snapshot::read_table(&self.client, id);
        let table = if stale {
            // A chunk refused the epoch: the write cannot go on without the new one.
            read.await.map_err(|e| {
                ExportError::Io(format!("volume {}: its epoch: {e}", self.spec.name))
            })?
        } else {
            // The periodic look is an optimisation (fenced chunks refuse an old epoch
            // anyway): it gets a short budget, and when the metadata copyset does not answer
            // within it the write goes on with the epoch it has, looking again later.
            let budget = async {
                glommio::timer::sleep(EPOCH_READ_BUDGET).await;
                None
            };
            match futures_lite::future::or(async { Some(read.await) }, budget).await {
                Some(Ok(table)) => table,
                _ => {
                    self.epoch.set((epoch, Some(now)));
                    return Ok(epoch);
                }
            }
        };
        if table.epoch != epoch {
            tracing::info!(volume = %self.spec.name, from = epoch, to = table.epoch,
                "the volume's epoch moved (a snapshot): writes carry the new one");
        }
        self.epoch.set((table.epoch, Some(now)));
        Ok(table.epoch)
    }

    /// Its description.
    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    /// Segments whose copysets this volume has cached (allocated ones it has touched).
    pub fn cached_segments(&self) -> Vec<SegmentRecord> {
        let mut segments: Vec<SegmentRecord> = self
            .segments
            .borrow()
            .values()
            .map(|r| SegmentRecord::clone(r))
            .collect();
        segments.sort_by_key(|r| r.segment);
        segments
    }

    /// A request to the cluster failed after the client's retries (its deadline passed, or
    /// the copyset refused it): the error the export answers with (EIO), logged at most once a
    /// second with the volume, the operation, where, the copyset and the cause.
    fn failed(
        &self,
        op: &str,
        offset: u64,
        route: (CopysetId, ChunkId),
        error: impl std::fmt::Display,
    ) -> ExportError {
        let (copyset, chunk) = route;
        let now = std::time::Instant::now();
        let (last, suppressed) = self.logged.get();
        if last.is_some_and(|at| now.duration_since(at) < ERROR_LOG_INTERVAL) {
            self.logged.set((last, suppressed + 1));
        } else {
            self.logged.set((Some(now), 0));
            tracing::warn!(
                volume = %self.export_name(),
                op,
                offset,
                copyset = %copyset,
                chunk = chunk.0,
                cause = %error,
                suppressed,
                "volume request failed; the client answers an I/O error"
            );
        }
        ExportError::Io(format!(
            "{op} of volume {} at {offset} (copyset {copyset}, chunk {}): {error}",
            self.spec.name, chunk.0
        ))
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

    /// Pieces of `[offset, offset + len)` that each stay within one chunk and `MAX_PIECE`.
    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let chunk_size = self.spec.chunk_size.max(1);
        let mut pieces = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let index = at / chunk_size;
            let within = at % chunk_size;
            let piece = (chunk_size - within).min(end - at).min(MAX_PIECE);
            pieces.push((at, index, within, piece));
            at += piece;
        }
        pieces
    }

    /// Where chunk `index` of the volume is; for a striped volume, its segment's copysets are
    /// read (and, when `write`, allocated) the first time and cached after.
    async fn route(&self, index: u64, write: bool) -> Result<Route, ExportError> {
        let (id, segment_size) = match self.spec.layout {
            VolumeLayout::Single {
                copyset,
                first_chunk,
            } => return Ok(Some((copyset, ChunkId(first_chunk.0 + index)))),
            VolumeLayout::Striped { id, segment_size } => (id, segment_size),
        };
        let per_segment = segment_size / self.spec.chunk_size.max(1);
        let segment = index / per_segment;
        let chunk = crate::placement::chunk_id(id, index)
            .map_err(|e| ExportError::Io(format!("volume {}: {e}", self.spec.name)))?;
        let Some(record) = self.segment(id, segment, write).await? else {
            return Ok(None);
        };
        let copyset = record
            .copysets
            .get((index % per_segment) as usize)
            .copied()
            .ok_or_else(|| {
                ExportError::Io(format!(
                    "volume {}: segment {segment}'s record places {} chunks, not chunk {}",
                    self.spec.name,
                    record.copysets.len(),
                    index % per_segment
                ))
            })?;
        Ok(Some((copyset, chunk)))
    }

    /// Segment `segment`'s record: cached, else read, else (when `write`) allocated.
    async fn segment(
        &self,
        id: u64,
        segment: u64,
        write: bool,
    ) -> Result<Option<Rc<SegmentRecord>>, ExportError> {
        if let Some(record) = self.segments.borrow().get(&segment) {
            return Ok(Some(Rc::clone(record)));
        }
        let lookup_failed = |error: VolumeError| {
            let what = if write { "allocating" } else { "looking up" };
            tracing::warn!(volume = %self.spec.name, segment, %error, "{what} a segment failed");
            ExportError::Io(format!(
                "volume {}: {what} segment {segment}: {error}",
                self.spec.name
            ))
        };
        let found = if write {
            let _one = self
                .allocating
                .acquire_permit(1)
                .await
                .map_err(|e| ExportError::Io(e.to_string()))?;
            if let Some(record) = self.segments.borrow().get(&segment) {
                return Ok(Some(Rc::clone(record)));
            }
            Some(
                pool::allocate_segment(&self.client, id, segment)
                    .await
                    .map_err(lookup_failed)?,
            )
        } else {
            pool::read_segment(&self.client, id, segment)
                .await
                .map_err(lookup_failed)?
        };
        // A segment never written is not cached: another client may allocate it.
        Ok(found.map(|record| {
            let record = Rc::new(record);
            self.segments
                .borrow_mut()
                .insert(segment, Rc::clone(&record));
            record
        }))
    }

    async fn read_bytes(&self, offset: u64, len: u64) -> Result<Bytes, ExportError> {
        self.check(offset, len)?;
        let reads = self
            .pieces(offset, len)
            .into_iter()
            .map(|piece| Box::pin(self.read_piece(piece)) as LocalFuture<'_, _>)
            .collect();
        let mut out = BytesMut::with_capacity(len as usize);
        for part in join_all(reads).await {
            let part: Bytes = part?;
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// One piece's bytes; zeros where its segment was never written.
    async fn read_piece(&self, piece: Piece) -> Result<Bytes, ExportError> {
        let (at, index, within, len) = piece;
        let Some(route) = self.route(index, false).await? else {
            return Ok(Bytes::from(vec![0u8; len as usize]));
        };
        if let Some(view) = &self.view {
            if !view.existed.get(index as usize).copied().unwrap_or(false) {
                return Ok(Bytes::from(vec![0u8; len as usize]));
            }
        }
        // The chunkservers read whole pages: widen, then cut.
        let start = within / PAGE * PAGE;
        let end = (within + len).div_ceil(PAGE) * PAGE;
        let data = self
            .refreshing(route.0, || async {
                match &self.view {
                    None => {
                        self.client
                            .read(route.0, route.1, start, (end - start) as u32)
                            .await
                    }
                    Some(view) => {
                        snapshot::read_version(
                            &self.client,
                            route.0,
                            route.1,
                            view.seq,
                            start,
                            (end - start) as u32,
                        )
                        .await
                    }
                }
            })
            .await
            .map_err(|e| self.failed("read", at, route, e))?;
        let from = (within - start) as usize;
        data.get(from..from + len as usize)
            .map(|slice| data.slice_ref(slice))
            .ok_or_else(|| ExportError::Io("a chunk read returned too few bytes".into()))
    }

    async fn write_bytes(&self, offset: u64, data: Bytes) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        if self.view.is_some() {
            return Err(ExportError::ReadOnly);
        }
        let writes = self
            .pieces(offset, data.len() as u64)
            .into_iter()
            .map(|piece| {
                let (at, _, _, len) = piece;
                let part = data.slice((at - offset) as usize..(at - offset + len) as usize);
                Box::pin(self.write_part(piece, part)) as LocalFuture<'_, _>
            })
            .collect();
        join_all(writes).await.into_iter().collect()
    }

    /// Writes one piece; a piece that does not cover whole pages is merged into the pages
    /// around it first.
    async fn write_part(&self, piece: Piece, part: Bytes) -> Result<(), ExportError> {
        let (at, index, within, len) = piece;
        let route = self.route(index, true).await?.ok_or_else(|| {
            ExportError::Io(format!(
                "volume {}: chunk {index} has no copyset after its segment's allocation",
                self.spec.name
            ))
        })?;
        if within % PAGE == 0 && len % PAGE == 0 {
            return self.write_piece(at, route, within, part).await;
        }
        let _serialized = self
            .partial
            .acquire_permit(1)
            .await
            .map_err(|e| ExportError::Io(e.to_string()))?;
        let start = within / PAGE * PAGE;
        let end = (within + len).div_ceil(PAGE) * PAGE;
        let current = self
            .refreshing(route.0, || {
                self.client
                    .read(route.0, route.1, start, (end - start) as u32)
            })
            .await
            .map_err(|e| self.failed("read before a partial write", at, route, e))?;
        let mut merged = BytesMut::from(&current[..]);
        if merged.len() != (end - start) as usize {
            return Err(ExportError::Io(
                "a chunk read returned too few bytes".into(),
            ));
        }
        let from = (within - start) as usize;
        merged[from..from + len as usize].copy_from_slice(&part);
        self.write_piece(at, route, start, merged.freeze()).await
    }

    async fn write_piece(
        &self,
        at: u64,
        route: (CopysetId, ChunkId),
        within: u64,
        data: Bytes,
    ) -> Result<(), ExportError> {
        let mut stale = false;
        loop {
            let sn = self.write_epoch(stale).await?;
            let written = self
                .refreshing(route.0, || {
                    self.client
                        .write(route.0, route.1, within as u32, data.clone(), sn)
                })
                .await;
            match written {
                // A fenced chunk: a snapshot raised the epoch since it was read. Once more
                // with the epoch read again; a second refusal is an error.
                Err(ClientError::Refused {
                    status: crate::protocol::Status::BackwardSn,
                    ..
                }) if !stale => stale = true,
                other => return other.map_err(|e| self.failed("write", at, route, e)),
            }
        }
    }

    /// Runs `call`; when a striped volume's request failed in a way a stale view of the
    /// copyset's nodes explains (no node it knows answered for the copyset before the
    /// deadline: the copyset moved), re-reads the voters from the pool, which follows
    /// membership changes, and runs it once more.
    async fn refreshing<T, Fut>(
        &self,
        copyset: CopysetId,
        call: impl Fn() -> Fut,
    ) -> Result<T, ClientError>
    where
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let stale = matches!(
            error,
            ClientError::Deadline { .. }
                | ClientError::NoNodes(_)
                | ClientError::Refused {
                    status: crate::protocol::Status::CopysetNotFound,
                    ..
                }
        );
        if !stale || !matches!(self.spec.layout, VolumeLayout::Striped { .. }) {
            return Err(error);
        }
        let Ok(pool) = pool::read_pool(&self.client).await else {
            return Err(error);
        };
        let Some(now) = pool.iter().find(|c| c.copyset == copyset) else {
            return Err(error);
        };
        tracing::info!(volume = %self.spec.name, %copyset, peers = ?now.peers, %error,
            "copyset unreachable at its known nodes; trying the pool's voters");
        self.client.set_peers(copyset, &now.peers);
        call().await
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

    fn read_only(&self) -> bool {
        self.view.is_some()
    }

    fn block_sizes(&self) -> (u32, u32, u32) {
        (512, PAGE as u32, 32 << 20)
    }

    fn read(&self, offset: u64, len: u32) -> ExportFuture<'_, Bytes> {
        Box::pin(async move {
            let result = self.read_bytes(offset, u64::from(len)).await;
            self.counted("read", result)
        })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> ExportFuture<'_, ()> {
        // Acknowledged writes are replicated and applied already: FUA holds without more work.
        Box::pin(async move {
            let result = self.write_bytes(offset, data).await;
            self.counted("write", result)
        })
    }

    fn flush(&self) -> ExportFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u32) -> ExportFuture<'_, ()> {
        Box::pin(async move {
            let result = self.zero(offset, u64::from(len)).await;
            self.counted("trim", result)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> ExportFuture<'_, ()> {
        Box::pin(async move {
            let result = self.zero(offset, u64::from(len)).await;
            self.counted("write_zeroes", result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;
    use crate::volume_table::VolumeRecord;

    fn volume(layout: VolumeLayout) -> Volume {
        let spec = VolumeRecord {
            name: "v".into(),
            size: 8 << 20,
            chunk_size: 2 << 20,
            layout,
        };
        Volume::new(spec, Rc::new(Client::new(&[], ClientConfig::default())))
    }

    #[test]
    fn requests_split_at_chunk_boundaries_and_the_piece_limit() {
        let volume = volume(VolumeLayout::Single {
            copyset: CopysetId(1),
            first_chunk: ChunkId(100),
        });
        let pieces = volume.pieces((2 << 20) - 4096, 8192);
        assert_eq!(
            pieces,
            vec![(2093056, 0, 2093056, 4096), (2097152, 1, 0, 4096)]
        );
        let pieces = volume.pieces(0, 3 << 20);
        assert_eq!(pieces.len(), 3, "1 MiB pieces");
        assert!(pieces.iter().all(|p| p.3 == 1 << 20));
        assert!(volume.check((8 << 20) - 1, 2).is_err());
    }

    #[test]
    fn chunks_of_a_striped_volume_route_by_their_segment_record() {
        let striped = volume(VolumeLayout::Striped {
            id: 600,
            segment_size: 4 << 20,
        });
        // Segment 1 (chunks 2 and 3) is cached as allocated over copysets 7 and 9.
        striped.segments.borrow_mut().insert(
            1,
            Rc::new(SegmentRecord {
                volume: 600,
                segment: 1,
                copysets: vec![CopysetId(7), CopysetId(9)],
            }),
        );
        let route = futures_lite::future::block_on(striped.route(3, false)).unwrap();
        assert_eq!(route, Some((CopysetId(9), ChunkId((600 << 32) | 3))));
        let single = volume(VolumeLayout::Single {
            copyset: CopysetId(4),
            first_chunk: ChunkId(100),
        });
        let route = futures_lite::future::block_on(single.route(3, true)).unwrap();
        assert_eq!(route, Some((CopysetId(4), ChunkId(103))));
    }

    #[test]
    fn join_all_keeps_the_order_of_its_futures() {
        let futures: Vec<LocalFuture<'_, u32>> = (0..5u32)
            .map(|i| Box::pin(async move { i * 2 }) as LocalFuture<'_, u32>)
            .collect();
        assert_eq!(
            futures_lite::future::block_on(join_all(futures)),
            vec![0, 2, 4, 6, 8]
        );
    }
}
