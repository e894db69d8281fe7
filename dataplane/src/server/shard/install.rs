//! Raft snapshots of a copyset: its chunks. A replica that fell behind the leader's log
//! compaction receives a snapshot whose data is empty (the engine compacts to its applied
//! index, so the chunks are the image); it then copies the chunks themselves from a replica
//! that has applied at least the snapshot's index, piece by piece, while that replica keeps
//! serving writes. `storage::engine::image` says why a copy made under writes is sound.
//!
//! Order on the receiving replica: applies already handed out finish; the chunks are copied
//! (chunks the image lacks are deleted); a checkpoint makes the chunk data and metadata
//! durable; only then is the snapshot record appended to the WAL and synced, and raft told.
//! A crash before the record leaves the copyset at its old applied index with some chunks
//! newer than it, which re-applying the log (or a new install) corrects: every copied chunk
//! records the applied index its copy started from. Persists that raft hands out meanwhile
//! wait behind the install, so the WAL keeps readies in order.

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use raftcore::{Entry, HardState, NodeId, Snapshot, SnapshotMeta};
use tracing::{debug, info, warn};

use super::{status_of_storage, CopysetCell, ShardServer};
use crate::ids::{ChunkId, CopysetId};
use crate::net::Message;
use crate::protocol::{
    self, ImageList, ImagePieceHeader, ReadImagePiece, Status, IMAGE_PIECE_HEADER_LEN,
};
use crate::storage::bdev::Bdev;
use crate::storage::engine::{ChunkImageMeta, ImagePart};
use crate::storage::StorageError;

/// How often a snapshot install's copy logs its progress.
const INSTALL_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Bytes of chunk data per `READ_CHUNK_IMAGE` (well under the frame's payload bound).
pub const IMAGE_PIECE_BYTES: u64 = 1 << 20;

/// Times one chunk's copy starts over because its versions changed under it, before the
/// attempt gives up (and the install tries again later, from a fresh list).
const CHUNK_RESTARTS_MAX: u32 = 8;

/// Says that the source's clone relationships changed during a copy, which must then start
/// over from an empty `copied` set (see `storage::engine::image`).
const START_OVER: &str = "clone relationships changed at the source during the copy";

/// A `Persist` raft handed out while an install of the same copyset runs (or the install's
/// own entries and hard state).
pub(super) struct PendingPersist {
    pub number: u64,
    /// A snapshot from the leader: installed (the chunks copied) before the entries.
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
}

/// Persists of one copyset that wait behind an install or a full WAL, in ready order.
pub(super) type Backlog = VecDeque<PendingPersist>;

/// The pace of one shard's snapshot installs: every piece reserves its bytes' time at
/// `rate` bytes per second after the pieces before it, and waits until its turn — the whole
/// shard's installs together, however many run. A rate of 0 means no limit.
#[derive(Default)]
pub(super) struct Pace {
    /// Bytes per second (0: unlimited).
    rate: Cell<u64>,
    /// When the bytes reserved so far are paid for.
    next: Cell<Option<Instant>>,
}

impl Pace {
    /// Reserves `bytes` at `now`; gives how long to wait before using them.
    pub(super) fn reserve(&self, now: Instant, bytes: u64) -> Duration {
        let rate = self.rate.get();
        if rate == 0 {
            return Duration::ZERO;
        }
        // Idle time is not saved up: a pause lets the next piece go at once, no burst more.
        let start = self.next.get().map_or(now, |next| next.max(now));
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next.set(Some(start + cost));
        start - now
    }
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Limits the shard's snapshot installs to `bytes_per_s` (0: unlimited).
    pub fn set_install_pace(&self, bytes_per_s: u64) {
        self.install_pace.rate.set(bytes_per_s);
    }
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Queues `persist` behind the copyset's backlog (an install, or a full WAL); gives it
    /// back when there is none.
    pub(super) fn queue_in_backlog(
        &self,
        copyset: CopysetId,
        persist: PendingPersist,
    ) -> Option<PendingPersist> {
        match self.backlog.borrow_mut().get_mut(&copyset) {
            Some(queue) => {
                queue.push_back(persist);
                None
            }
            None => Some(persist),
        }
    }

    /// Appends a ready's entries and hard state to the WAL; while the WAL is full, runs
    /// checkpoints (which reclaim what every copyset applied) and tries again. Returns the
    /// position to sync to.
    pub(super) async fn append_persist(
        &self,
        copyset: CopysetId,
        persist: &PendingPersist,
    ) -> Result<u64, StorageError> {
        loop {
            match self.append_now(copyset, persist) {
                Ok(lsn) => return Ok(lsn),
                // Entries appended before the WAL filled are appended again: an entry at an
                // index the log has replaces it.
                Err(StorageError::WalFull { .. }) => self.make_wal_room().await?,
                Err(error) => return Err(error),
            }
        }
    }

    /// Appends a ready's entries, then its hard state, to the WAL's open batch (no I/O).
    /// Returns the position to sync to.
    pub(super) fn append_now(
        &self,
        copyset: CopysetId,
        persist: &PendingPersist,
    ) -> Result<u64, StorageError> {
        let wal = self.engine.wal();
        let mut lsn = wal.append_entries(copyset, &persist.entries)?;
        if let Some(hard_state) = persist.hard_state {
            lsn = wal.set_hard_state(copyset, hard_state)?;
        }
        Ok(lsn)
    }

    /// A checkpoint to reclaim WAL space, then a short pause so applies can move the point
    /// the WAL may reclaim to.
    pub(super) async fn make_wal_room(&self) -> Result<(), StorageError> {
        self.metrics
            .counter(
                "chunkserver_wal_full_total",
                "Times a WAL append found the ring full and waited for a checkpoint.",
                &[],
            )
            .inc();
        self.engine.checkpoint().await?;
        glommio::timer::sleep(Duration::from_millis(2)).await;
        Ok(())
    }

    /// Persists the copyset's backlog in order — installing the snapshot of a persist that
    /// carries one first — reporting each to raft, until it is empty.
    pub(super) async fn drain_backlog(self: Rc<Self>, copyset: CopysetId, core: CopysetCell<B>) {
        loop {
            let next = self
                .backlog
                .borrow_mut()
                .get_mut(&copyset)
                .and_then(VecDeque::pop_front);
            let Some(mut persist) = next else {
                self.backlog.borrow_mut().remove(&copyset);
                return;
            };
            let installed = match persist.snapshot.take() {
                Some(snapshot) => {
                    self.installing.borrow_mut().insert(copyset);
                    let installed = self.install(copyset, &core, &snapshot.meta).await;
                    if installed.is_none() {
                        return; // logged; the copyset stalls
                    }
                    installed
                }
                None => None,
            };
            // Every plain persist queued by now goes with this one, under one sync: under a
            // steady load raft hands out persists as fast as they drain, and one sync each
            // kept a copyset that once had a backlog (an install, a full WAL) in it for good,
            // its log falling further behind its leader's (docs/benchmarking.md, "Recovery").
            let mut batch = vec![persist];
            if installed.is_none() {
                batch.extend(self.take_plain_backlog(copyset));
            }
            let mut last = None;
            for persist in &batch {
                match self.append_persist(copyset, persist).await {
                    Ok(lsn) => last = Some(lsn),
                    Err(error) => {
                        self.stalled(Some(copyset), "WAL write failed", &error);
                        return;
                    }
                }
            }
            if let Some(lsn) = last {
                if let Err(error) = self.engine.wal().sync(lsn).await {
                    self.stalled(Some(copyset), "WAL write failed", &error);
                    return;
                }
            }
            for persist in &batch {
                core.borrow_mut().on_persisted(persist.number);
            }
            if let Some((index, chunks, bytes, began)) = installed {
                core.borrow_mut().on_snapshot_installed(index);
                self.installing.borrow_mut().remove(&copyset);
                self.metrics
                    .counter(
                        "chunkserver_snapshot_installs_total",
                        "Copyset snapshots installed by copying the chunks from a replica.",
                        &[],
                    )
                    .inc();
                self.metrics
                    .counter(
                        "chunkserver_snapshot_install_bytes_total",
                        "Chunk bytes copied by snapshot installs (all-zero pieces excluded).",
                        &[],
                    )
                    .add(bytes);
                info!(node = self.node, %copyset, %index, chunks, bytes,
                    seconds = began.elapsed().as_secs_f64(), "snapshot installed");
            }
            self.drive(copyset, &core);
        }
    }

    /// The persists queued for `copyset` up to (not including) the next one that carries a
    /// snapshot, taken off its backlog in order.
    fn take_plain_backlog(&self, copyset: CopysetId) -> Vec<PendingPersist> {
        let mut backlog = self.backlog.borrow_mut();
        let Some(queue) = backlog.get_mut(&copyset) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        while queue.front().is_some_and(|p| p.snapshot.is_none()) {
            if let Some(persist) = queue.pop_front() {
                taken.push(persist);
            }
        }
        taken
    }

    /// Starts persisting a ready that carries a snapshot: the install and what follows run
    /// through the copyset's backlog, in order.
    pub(super) fn start_install(
        self: &Rc<Self>,
        copyset: CopysetId,
        core: &CopysetCell<B>,
        persist: PendingPersist,
    ) {
        self.backlog
            .borrow_mut()
            .insert(copyset, VecDeque::from([persist]));
        let server = Rc::clone(self);
        let core = Rc::clone(core);
        glommio::spawn_local(server.drain_backlog(copyset, core)).detach();
    }

    /// Installs a snapshot: waits for the applies in flight, copies the chunks, makes them
    /// durable, and appends the snapshot record. Returns (index, chunks, bytes, start), or
    /// `None` after a failure that stalls the copyset (logged).
    async fn install(
        &self,
        copyset: CopysetId,
        core: &CopysetCell<B>,
        meta: &SnapshotMeta,
    ) -> Option<(raftcore::LogIndex, usize, u64, std::time::Instant)> {
        let began = std::time::Instant::now();
        info!(node = self.node, %copyset, index = %meta.index, "installing a snapshot: copying the chunks");
        while core.borrow().applies_in_flight() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let mut copied = BTreeSet::new();
        let mut pause = Duration::from_millis(20);
        let mut bytes = 0u64;
        'copy: loop {
            for source in self.image_sources(copyset, core, meta) {
                match self
                    .copy_image(copyset, source, meta, &mut copied, &mut bytes)
                    .await
                {
                    Ok(()) => break 'copy,
                    Err(reason) => {
                        if reason.contains(START_OVER) {
                            copied.clear();
                        }
                        warn!(node = self.node, %copyset, source = source.0, %reason,
                            "copyset image copy interrupted; trying again");
                    }
                }
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        // The chunks and their metadata are durable before the record that says they are.
        if let Err(error) = self.engine.checkpoint().await {
            self.stalled(
                Some(copyset),
                "checkpoint after copying an image failed",
                &error,
            );
            return None;
        }
        let wal = self.engine.wal();
        loop {
            let snapshot = Snapshot {
                meta: meta.clone(),
                data: Bytes::new(),
            };
            let result = match wal.install_snapshot(copyset, snapshot) {
                Err(StorageError::WalFull { .. }) => self.make_wal_room().await.map(|()| false),
                other => other.map(|_| true),
            };
            match result {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => {
                    self.stalled(Some(copyset), "snapshot record not appended", &error);
                    return None;
                }
            }
        }
        self.engine.set_applied(copyset, meta.index);
        Some((meta.index, copied.len(), bytes, began))
    }

    /// Replicas to copy from: the leader first, then the other voters of the snapshot's
    /// membership and of the current one.
    fn image_sources(
        &self,
        copyset: CopysetId,
        core: &CopysetCell<B>,
        meta: &SnapshotMeta,
    ) -> Vec<NodeId> {
        let core = core.borrow();
        let mut sources: Vec<NodeId> = core.leader().into_iter().collect();
        let conf = core.conf_state();
        let voters = meta
            .conf_state
            .voters
            .iter()
            .chain(&meta.conf_state.voters_outgoing)
            .chain(&conf.voters)
            .chain(&conf.voters_outgoing);
        for voter in voters {
            if !sources.contains(voter) {
                sources.push(*voter);
            }
        }
        sources.retain(|n| n.0 != self.node);
        debug!(%copyset, ?sources, "image sources");
        sources
    }

    async fn image_call(
        &self,
        copyset: CopysetId,
        source: NodeId,
        opcode: crate::net::Opcode,
        body: Bytes,
    ) -> Result<(Status, Bytes), String> {
        let (_, shard) = self
            .cluster
            .peer_shard(source.0, copyset)
            .ok_or_else(|| format!("no address for node {}", source.0))?;
        let peer = self
            .peer(source.0, shard)
            .ok_or_else(|| format!("no address for node {}", source.0))?;
        let connection = peer.connection().await.map_err(|e| e.to_string())?;
        let response = connection
            .call(Message::new(opcode, copyset.0, body))
            .await
            .map_err(|e| e.to_string())?;
        protocol::decode_response(&response.payload).map_err(|e| e.to_string())
    }

    /// Copies the image of `copyset` from `source`, skipping the chunks in `copied` (done by
    /// an earlier attempt).
    async fn copy_image(
        &self,
        copyset: CopysetId,
        source: NodeId,
        meta: &SnapshotMeta,
        copied: &mut BTreeSet<ChunkId>,
        bytes: &mut u64,
    ) -> Result<(), String> {
        let (status, body) = self
            .image_call(copyset, source, protocol::LIST_CHUNK_IMAGE, Bytes::new())
            .await?;
        if status != Status::Ok {
            return Err(format!("list refused: {status:?}"));
        }
        let list = ImageList::decode(&body).map_err(|e| e.to_string())?;
        if list.applied < meta.index.0 {
            return Err(format!(
                "the source applied only {} of the snapshot's {}",
                list.applied, meta.index
            ));
        }
        let chunk_size = self.engine.layout().geometry.chunk_size;
        if list.chunk_size != chunk_size {
            return Err(format!(
                "the source's chunks are {} bytes, this shard's {chunk_size}",
                list.chunk_size
            ));
        }
        let keep: BTreeSet<ChunkId> = list.chunks.iter().copied().collect();
        self.engine
            .prepare_image(copyset, &keep, copied)
            .await
            .map_err(|e| e.to_string())?;
        let total = list.chunks.len();
        let mut said = Instant::now();
        for chunk in list.chunks {
            if copied.contains(&chunk) {
                continue;
            }
            *bytes += self
                .copy_chunk(copyset, source, meta, chunk, list.clone_epoch)
                .await?;
            copied.insert(chunk);
            // A long copy says how far it is, every few seconds.
            if said.elapsed() >= INSTALL_PROGRESS_EVERY {
                said = Instant::now();
                info!(%copyset, chunks = copied.len(), of = total, mib = *bytes >> 20,
                    "installing a snapshot: copying the chunks");
            }
        }
        Ok(())
    }

    /// Copies one chunk; returns the bytes that travelled.
    async fn copy_chunk(
        &self,
        copyset: CopysetId,
        source: NodeId,
        meta: &SnapshotMeta,
        chunk: ChunkId,
        clone_epoch: u64,
    ) -> Result<u64, String> {
        let chunk_size = self.engine.layout().geometry.chunk_size;
        self.engine
            .copy_chunk_image(
                copyset,
                chunk,
                chunk_size,
                IMAGE_PIECE_BYTES,
                CHUNK_RESTARTS_MAX,
                async |part, offset, len| {
                    let piece = self
                        .image_piece(copyset, source, meta, chunk, part, offset, len)
                        .await?;
                    if let Some((header, _)) = &piece {
                        if header.1 != clone_epoch {
                            return Err(START_OVER.to_string());
                        }
                    }
                    Ok(piece.map(|((meta, _), data)| (meta, data)))
                },
            )
            .await
    }

    /// One piece from the source; `None` when the chunk no longer exists there.
    #[allow(clippy::too_many_arguments)]
    async fn image_piece(
        &self,
        copyset: CopysetId,
        source: NodeId,
        meta: &SnapshotMeta,
        chunk: ChunkId,
        part: ImagePart,
        offset: u64,
        len: u64,
    ) -> Result<Option<((ChunkImageMeta, u64), Bytes)>, String> {
        // Only the copy into a replica the scheduler added is paced: a voter that restarts
        // behind its copyset catches up at full speed, since the copyset may need it for a
        // quorum (the fault suite's disk faults and power cuts showed the difference).
        if self.lifecycle.borrow().joined_lately(copyset) {
            let wait = self.install_pace.reserve(Instant::now(), len);
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
        }
        let request = ReadImagePiece {
            chunk,
            part: match part {
                ImagePart::Current => 0,
                ImagePart::Snapshot => 1,
            },
            offset,
            len: len as u32,
        };
        let (status, body) = self
            .image_call(
                copyset,
                source,
                protocol::READ_CHUNK_IMAGE,
                request.encode(),
            )
            .await?;
        match status {
            Status::Ok => {}
            Status::ChunkNotFound => return Ok(None),
            other => return Err(format!("piece of chunk {chunk} refused: {other:?}")),
        }
        let (header, data) = ImagePieceHeader::decode(&body).map_err(|e| e.to_string())?;
        if header.source_applied < meta.index.0 {
            return Err(format!(
                "the source applied only {} of the snapshot's {} (restarted?)",
                header.source_applied, meta.index
            ));
        }
        let expected = if header.zero { 0 } else { len as usize };
        if data.len() != expected {
            return Err(format!(
                "piece of chunk {chunk} at {offset}: {} bytes, expected {expected}",
                data.len()
            ));
        }
        let meta = ChunkImageMeta {
            sn: header.sn,
            corrected_sn: header.corrected_sn,
            snapshot_sn: header.snapshot_sn,
            applied: header.applied,
            clone_source: header.clone_source,
        };
        Ok(Some(((meta, header.clone_epoch), data)))
    }

    /// The copyset this replica can serve an image of, or the answer saying why not (no such
    /// copyset, or it is installing an image itself).
    fn image_source_core(&self, copyset: CopysetId) -> Result<CopysetCell<B>, (Status, Bytes)> {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Err((Status::CopysetNotFound, Bytes::new()));
        };
        if self.installing.borrow().contains(&copyset) {
            return Err((
                Status::Retry("this replica is installing an image itself".into()),
                Bytes::new(),
            ));
        }
        Ok(core)
    }

    /// Answers `LIST_CHUNK_IMAGE` as the source of an image.
    pub(super) fn serve_image_list(&self, copyset: CopysetId) -> (Status, Bytes) {
        let core = match self.image_source_core(copyset) {
            Ok(core) => core,
            Err(answer) => return answer,
        };
        let list = ImageList {
            applied: core.borrow().applied().0,
            chunk_size: self.engine.layout().geometry.chunk_size,
            clone_epoch: self.engine.clone_epoch(),
            chunks: self.engine.chunks_of(copyset),
        };
        (Status::Ok, list.encode())
    }

    /// Answers `READ_CHUNK_IMAGE` as the source of an image.
    pub(super) async fn serve_image_piece(
        &self,
        copyset: CopysetId,
        payload: &[u8],
    ) -> (Status, Bytes) {
        let request = match ReadImagePiece::decode(payload) {
            Ok(request) => request,
            Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
        };
        let core = match self.image_source_core(copyset) {
            Ok(core) => core,
            Err(answer) => return answer,
        };
        if let Err(error) = self.engine.check_owner(request.chunk, copyset) {
            return (status_of_storage(&error), Bytes::new());
        }
        // Read before the piece: the piece holds at least this state.
        let source_applied = core.borrow().applied().0;
        let part = if request.part == 1 {
            ImagePart::Snapshot
        } else {
            ImagePart::Current
        };
        let piece = match self
            .engine
            .read_image_piece(request.chunk, part, request.offset, u64::from(request.len))
            .await
        {
            Ok(piece) => piece,
            Err(error) => return (status_of_storage(&error), Bytes::new()),
        };
        let data = piece.data.as_ref().map_or(&[][..], |d| d.as_slice());
        let header = ImagePieceHeader {
            source_applied,
            sn: piece.meta.sn,
            corrected_sn: piece.meta.corrected_sn,
            snapshot_sn: piece.meta.snapshot_sn,
            applied: piece.meta.applied,
            clone_source: piece.meta.clone_source,
            // Read after the piece: a change since the list, or while the piece was read, shows.
            clone_epoch: self.engine.clone_epoch(),
            zero: piece.data.is_none(),
        };
        let mut body = BytesMut::with_capacity(IMAGE_PIECE_HEADER_LEN + data.len());
        header.encode(&mut body);
        body.extend_from_slice(data);
        (Status::Ok, body.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_spaces_pieces_at_the_rate_and_does_not_save_up_idle_time() {
        let pace = Pace::default();
        let t0 = Instant::now();
        // Unlimited: never waits.
        assert_eq!(pace.reserve(t0, 1 << 30), Duration::ZERO);
        pace.rate.set(1 << 20); // 1 MiB/s
        assert_eq!(pace.reserve(t0, 1 << 20), Duration::ZERO);
        // The next MiB, asked at once, waits the first one's second; the one after, two.
        assert_eq!(pace.reserve(t0, 1 << 20), Duration::from_secs(1));
        assert_eq!(pace.reserve(t0, 512 << 10), Duration::from_secs(2));
        // Asked once all that is paid for (and more), it goes at once: idle time is lost.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pace.reserve(later, 1 << 20), Duration::ZERO);
        assert_eq!(
            pace.reserve(later, 1 << 20),
            Duration::from_secs(1),
            "paced again after the idle time"
        );
    }
}
