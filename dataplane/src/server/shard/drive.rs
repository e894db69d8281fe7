//! The drive loop: carries out the commands a copyset core hands out.

use std::rc::Rc;

use bytes::Bytes;
use tracing::{debug, error, info, warn};

use super::apply::apply_op;
use super::{install, status_of_storage, CopysetCell, ReadRequest, ShardServer};
use crate::copyset::{Action, Refusal, Token};
use crate::ids::CopysetId;
use crate::protocol::{Membership, Status};
use crate::storage::bdev::Bdev;
use crate::storage::engine::ShardEngine;
use crate::storage::StorageError;

impl<B: Bdev + 'static> ShardServer<B> {
    /// Carries out every command the copyset has.
    pub(super) fn drive(self: &Rc<Self>, copyset: CopysetId, core: &CopysetCell<B>) {
        loop {
            let action = core.borrow_mut().next_action();
            let Some(action) = action else {
                // Entries that touch no chunk (a new leader's no-op, membership changes,
                // undecodable entries) are applied by the core alone, without an `Apply`
                // command. The WAL must learn of them too: an idle copyset whose last entry
                // is such an entry would otherwise pin the ring's head for good, and a full
                // ring stops every copyset of the shard from persisting a vote (issue 17).
                let applied = core.borrow().applied();
                self.engine.set_applied(copyset, applied);
                return;
            };
            match action {
                Action::Send(message) => self.send_raft(copyset, message),
                Action::Persist {
                    number,
                    snapshot,
                    entries,
                    hard_state,
                } => self.persist(copyset, core, number, snapshot, entries, hard_state),
                Action::Apply { index, op, token } => {
                    self.start_apply(copyset, core, index, op, token)
                }
                Action::Refuse { token, refusal } => self.refuse(token, refusal),
                Action::Read { token } => self.start_read(copyset, token),
                Action::ConfChanged {
                    index,
                    conf_state,
                    tokens,
                } => self.record_membership(copyset, index, conf_state, tokens),
                Action::RoleChanged { role, leader } => {
                    info!(node = self.node, %copyset, ?role, leader = leader.map(|l| l.0), "role changed");
                }
            }
        }
    }

    /// Queues a raft message for its destination shard's next frame.
    fn send_raft(&self, copyset: CopysetId, message: raftcore::Message) {
        let to = message.to.0;
        let Some((_, shard)) = self.cluster.peer_shard(to, copyset) else {
            debug!(%copyset, to, "raft message to an unknown node dropped");
            return;
        };
        let bytes = raftcore::encode_to_bytes(&message);
        self.outbox
            .borrow_mut()
            .entry((to, shard))
            .or_default()
            .push((copyset.0, bytes));
        self.outbox_ready.notify();
    }

    /// Appends a ready's entries and hard state to the WAL and syncs them (or queues them
    /// behind an install or a full WAL), then reports them persisted.
    fn persist(
        self: &Rc<Self>,
        copyset: CopysetId,
        core: &CopysetCell<B>,
        number: u64,
        snapshot: Option<raftcore::Snapshot>,
        entries: Vec<raftcore::Entry>,
        hard_state: Option<raftcore::HardState>,
    ) {
        let persist = install::PendingPersist {
            number,
            snapshot,
            entries,
            hard_state,
        };
        let Some(persist) = self.queue_in_backlog(copyset, persist) else {
            return; // an install or a full WAL holds earlier ones: in order
        };
        if persist.snapshot.is_some() {
            self.start_install(copyset, core, persist);
            return;
        }
        let lsn = match self.append_now(copyset, &persist) {
            Ok(lsn) => lsn,
            Err(StorageError::WalFull { .. }) => {
                // Wait for a checkpoint to make room, with whatever raft hands
                // out meanwhile queued behind, in order.
                warn!(node = self.node, %copyset, "WAL full; persisting after a checkpoint");
                self.backlog
                    .borrow_mut()
                    .insert(copyset, std::collections::VecDeque::from([persist]));
                let server = Rc::clone(self);
                let core = Rc::clone(core);
                glommio::spawn_local(server.drain_backlog(copyset, core)).detach();
                return;
            }
            Err(error) => {
                self.stalled(Some(copyset), "WAL append failed", &error);
                return;
            }
        };
        let number = persist.number;
        let engine = Rc::clone(&self.engine);
        let core = Rc::clone(core);
        let server = Rc::clone(self);
        glommio::spawn_local(async move {
            match engine.wal().sync(lsn).await {
                Ok(()) => {
                    core.borrow_mut().on_persisted(number);
                    server.drive(copyset, &core);
                }
                Err(error) => server.stalled(Some(copyset), "WAL sync failed", &error),
            }
        })
        .detach();
    }

    /// Applies a committed operation in its own task, then answers its client.
    fn start_apply(
        self: &Rc<Self>,
        copyset: CopysetId,
        core: &CopysetCell<B>,
        index: raftcore::LogIndex,
        op: crate::copyset::ChunkOp,
        token: Option<Token>,
    ) {
        let engine = Rc::clone(&self.engine);
        let core = Rc::clone(core);
        let server = Rc::clone(self);
        glommio::spawn_local(async move {
            // glommio runs a spawned task at once; an apply that finishes without
            // waiting (memory device, or an entry the chunk already holds) would
            // drive the next one inside this call, and a long run of them would
            // overflow the stack. Yielding first makes each its own turn.
            futures_lite::future::yield_now().await;
            let chunk = op.chunk();
            let (result, body) = match op {
                crate::copyset::ChunkOp::Scrub { chunk, offset, len } => {
                    let range = (chunk, offset, len);
                    match super::scrub::apply_scrub(&engine, copyset, range, index).await {
                        Ok(sums) => (Ok(()), server.keep_scrub(copyset, &sums)),
                        Err(error) => (Err(error), Bytes::new()),
                    }
                }
                op => (apply_op(&engine, copyset, op, index).await, Bytes::new()),
            };
            let status = match &result {
                Ok(()) => Status::Ok,
                Err(error) => status_of_storage(error),
            };
            if let (Status::Io(_), Err(error)) = (&status, &result) {
                // The entry is not applied, so the copyset must not move past it.
                server.stalled(Some(copyset), "apply failed", error);
            } else {
                if result.is_err() {
                    // A refusal every replica makes alike: the entry counts as
                    // applied to the chunk (replays and image copies rely on it).
                    engine.note_applied(copyset, chunk, index);
                }
                core.borrow_mut().on_applied(index, chunk);
                let applied = core.borrow().applied();
                engine.set_applied(copyset, applied);
            }
            if let Some(token) = token {
                if let Some(span) = server.traced.borrow().get(&token) {
                    info!(parent: span, %index, "applied");
                }
                server.answer(token, status, body);
            }
            server.drive(copyset, &core);
        })
        .detach();
    }

    /// Answers a request the copyset refused.
    fn refuse(&self, token: Token, refusal: Refusal) {
        self.reads.borrow_mut().remove(&token);
        let status = match refusal {
            Refusal::NotLeader { leader } => Status::Redirect {
                leader: leader.map_or(0, |l| l.0),
            },
            Refusal::Dropped => Status::Retry("replaced by a new leader's entry".into()),
            Refusal::Invalid(reason) => Status::Invalid(reason),
            Refusal::Busy(reason) => Status::Retry(reason),
        };
        self.answer(token, status, Bytes::new());
    }

    /// Serves a read whose read index is applied, in its own task.
    fn start_read(self: &Rc<Self>, copyset: CopysetId, token: Token) {
        let Some((_, request)) = self.reads.borrow_mut().remove(&token) else {
            return;
        };
        let engine = Rc::clone(&self.engine);
        let server = Rc::clone(self);
        glommio::spawn_local(async move {
            let len = match request {
                ReadRequest::Chunk(r) => r.len,
                ReadRequest::Snapshot(r) => r.len,
            };
            let mut result = read_request(&engine, &request).await;
            // A read the device fails is tried once more (a transient error
            // passes); failing again, the device is taken for failed and the
            // process stops, so that the client's retry reaches a replica whose
            // device reads, rather than answering an I/O error for data the
            // other replicas hold.
            if let Err(error) = &result {
                if error.is_device_failure() {
                    warn!(node = server.node, %copyset, %error, "read failed on the device; trying once more");
                    result = read_request(&engine, &request).await;
                    if let Err(error) = &result {
                        if error.is_device_failure() {
                            server.stalled(Some(copyset), "read failed twice", error);
                        }
                    }
                }
            }
            match result {
                Ok(buffer) => {
                    let data = Bytes::copy_from_slice(buffer.as_slice());
                    server.answer(token, Status::Ok, data);
                }
                // A chunk never written reads as zeroes, like a fresh device.
                Err(StorageError::ChunkNotFound(_))
                    if matches!(request, ReadRequest::Chunk(_)) =>
                {
                    let zeroes = Bytes::from(vec![0u8; len as usize]);
                    server.answer(token, Status::Ok, zeroes);
                }
                Err(error) => {
                    server.answer(token, status_of_storage(&error), Bytes::new())
                }
            }
        })
        .detach();
    }

    /// Records a membership change in the WAL, then answers the requests that asked for it.
    fn record_membership(
        self: &Rc<Self>,
        copyset: CopysetId,
        index: raftcore::LogIndex,
        conf_state: raftcore::ConfState,
        tokens: Vec<Token>,
    ) {
        // Everything up to `index` is applied: the membership and the applied
        // index go together, so a restart's `initial_state()` is the membership
        // as of its applied index (raft does not hand these entries out again
        // once the applied index passes them).
        info!(node = self.node, %copyset, %index, voters = ?conf_state.voters,
            outgoing = ?conf_state.voters_outgoing, "membership changed");
        let membership = Membership::of(&conf_state).encode();
        let wal = self.engine.wal();
        // The membership goes into the WAL before the applied index passes its entry, so no
        // checkpoint can record the new index with the old membership (issue 25, item 4).
        let lsn = match wal.set_conf_state(copyset, conf_state.clone()) {
            Ok(lsn) => {
                self.engine.set_applied(copyset, index);
                lsn
            }
            Err(StorageError::WalFull { .. }) => {
                // Room comes with a checkpoint; until the record is in, the applied index
                // stays below the change.
                self.engine.hold_applied_below(copyset, index);
                let server = Rc::clone(self);
                glommio::spawn_local(async move {
                    server
                        .record_membership_after_room(
                            copyset, index, conf_state, tokens, membership,
                        )
                        .await;
                })
                .detach();
                return;
            }
            Err(error) => {
                if error.is_device_failure() {
                    self.stalled(Some(copyset), "membership not recorded", &error);
                }
                error!(%copyset, %error, "membership not recorded in the WAL");
                for token in tokens {
                    self.answer(token, status_of_storage(&error), Bytes::new());
                }
                return;
            }
        };
        let engine = Rc::clone(&self.engine);
        let server = Rc::clone(self);
        glommio::spawn_local(async move {
            let status = match engine.wal().sync(lsn).await {
                Ok(()) => Status::Ok,
                Err(error) => {
                    server.stalled(Some(copyset), "WAL sync of the membership failed", &error);
                    status_of_storage(&error)
                }
            };
            for token in tokens {
                server.answer(token, status.clone(), membership.clone());
            }
        })
        .detach();
    }

    /// Records a membership change the full WAL refused: checkpoints until the record fits
    /// (the ring's reserve guarantees room for raft's records after one), then lets the
    /// applied index pass the change and answers.
    async fn record_membership_after_room(
        self: Rc<Self>,
        copyset: CopysetId,
        index: raftcore::LogIndex,
        conf_state: raftcore::ConfState,
        tokens: Vec<Token>,
        membership: Bytes,
    ) {
        let wal = self.engine.wal();
        let recorded = loop {
            if let Err(error) = self.make_wal_room().await {
                break Err(error);
            }
            match wal.set_conf_state(copyset, conf_state.clone()) {
                Ok(lsn) => break wal.sync(lsn).await,
                Err(StorageError::WalFull { .. }) => continue,
                Err(error) => break Err(error),
            }
        };
        let status = match recorded {
            Ok(()) => {
                self.engine.release_applied(copyset);
                self.engine.set_applied(copyset, index);
                if let Some(core) = self.copysets.borrow().get(&copyset).cloned() {
                    self.engine.set_applied(copyset, core.borrow().applied());
                }
                Status::Ok
            }
            Err(error) => {
                // The hold stays: the applied index never passes an unrecorded membership.
                self.stalled(Some(copyset), "membership not recorded", &error);
                status_of_storage(&error)
            }
        };
        for token in tokens {
            self.answer(token, status.clone(), membership.clone());
        }
    }
}

/// Reads what `request` asks of the engine.
async fn read_request<B: Bdev>(
    engine: &ShardEngine<B>,
    request: &ReadRequest,
) -> Result<crate::storage::dma::DmaBuf, StorageError> {
    match request {
        ReadRequest::Chunk(r) => engine.read_chunk(r.chunk, r.offset, u64::from(r.len)).await,
        ReadRequest::Snapshot(r) => {
            engine
                .read_snapshot(r.chunk, r.sn, r.offset, u64::from(r.len))
                .await
        }
    }
}
