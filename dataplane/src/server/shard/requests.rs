//! Service requests: decoded at the edge, forwarded to the shard that owns the copyset, or
//! carried out here — proposed to the copyset, read at its read index, or answered at once.

use std::rc::Rc;

use bytes::Bytes;
use raftcore::{NodeId, StateRole};
use tracing::{debug, info, warn};

use super::{status_of_storage, CopysetCell, Forwarded, ReadRequest, ShardServer, FORWARD_TIMEOUT};
use crate::copyset::{ChunkOp, Token};
use crate::ids::{ChunkId, CopysetId};
use crate::net::queue::oneshot;
use crate::net::{Incoming, Message};
use crate::protocol::{
    self, shard_of, CopysetStatus, CreateCopyset, Membership, ReadChunk, ReadSnapshot, ResetPeers,
    Status,
};
use crate::storage::bdev::Bdev;

impl<B: Bdev + 'static> ShardServer<B> {
    /// A raft frame: from peers only; on a client port it is refused whole (issue 25,
    /// item 8).
    async fn serve_raft_frame(self: &Rc<Self>, incoming: Incoming, class: &'static str) {
        let copyset = incoming.message.copyset;
        let status = if class == "peer" {
            self.receive_raft(&incoming.message.payload);
            Status::Ok
        } else {
            self.count_raft_dropped("on a client port");
            warn!(
                node = self.node,
                shard = self.shard,
                "raft frame on a client port refused"
            );
            Status::Invalid("raft frames are taken on the peer port only".into())
        };
        if incoming.expects_response() {
            let response = Message::new(
                protocol::RAFT,
                copyset,
                protocol::encode_response(&status, &[]),
            );
            if let Err(error) = incoming.respond(response).await {
                debug!(%error, "response not sent");
            }
        }
    }

    pub(super) async fn serve_request(self: Rc<Self>, incoming: Incoming, class: &'static str) {
        use tracing::Instrument;
        let opcode = incoming.message.opcode;
        let copyset = CopysetId(incoming.message.copyset);
        let payload = incoming.message.payload.clone();
        self.count_frame(class, "in", payload.len());
        if let Some(role) = incoming.connection().peer_role() {
            if !protocol::access::allowed(role, opcode) {
                return self.refuse_for_role(incoming, role).await;
            }
        }
        if opcode == protocol::RAFT {
            return self.serve_raft_frame(incoming, class).await;
        }
        let began = std::time::Instant::now();
        let request_bytes = payload.len() as u64;
        let in_flight = Rc::clone(self.hot.in_flight.get_or_init(|| {
            self.metrics.gauge(
                "chunkserver_requests_in_flight",
                "Service requests received and not answered yet (the shard's queue depth).",
                &[],
            )
        }));
        let in_flight = InFlight::new(in_flight);
        let seen = self.received.get() + 1;
        self.received.set(seen);
        let every = self.trace_every.get();
        let (status, body) = if every > 0 && seen % every == 0 {
            let span = tracing::info_span!(
                "request",
                node = self.node,
                shard = self.shard,
                %copyset,
                op = protocol::opcode_name(opcode),
                trace = seen
            );
            info!(parent: &span, bytes = request_bytes, "received");
            let answer = self
                .handle(opcode, copyset, payload)
                .instrument(span.clone())
                .await;
            info!(parent: &span, status = answer.0.name(),
                micros = began.elapsed().as_micros() as u64, "replied");
            answer
        } else {
            self.handle(opcode, copyset, payload).await
        };
        drop(in_flight);
        self.count_request(
            opcode,
            &status,
            request_bytes + body.len() as u64,
            began.elapsed(),
        );
        if incoming.expects_response() {
            let response =
                Message::new(opcode, copyset.0, protocol::encode_response(&status, &body));
            let len = response.payload.len();
            match incoming.respond(response).await {
                Ok(()) => self.count_frame(class, "out", len),
                Err(error) => debug!(%error, "response not sent"),
            }
        }
    }

    /// Refuses a request the connection's proven role may not make (`protocol::access`).
    async fn refuse_for_role(&self, incoming: Incoming, role: protocol::access::Role) {
        let opcode = incoming.message.opcode;
        self.metrics
            .counter(
                "chunkserver_requests_refused_total",
                "Requests refused because the connection's role may not make them.",
                &[("role", role.name())],
            )
            .inc();
        debug!(
            node = self.node,
            role = role.name(),
            op = protocol::opcode_name(opcode),
            "request refused for the connection's role"
        );
        if incoming.expects_response() {
            let status = Status::Invalid(format!(
                "{} needs another role than {}: this connection proved the {} role (the \
                 admin role, from the cluster secret, may do everything)",
                protocol::opcode_name(opcode),
                role.name(),
                role.name()
            ));
            let copyset = incoming.message.copyset;
            let response = Message::new(opcode, copyset, protocol::encode_response(&status, &[]));
            if let Err(error) = incoming.respond(response).await {
                debug!(%error, "response not sent");
            }
        }
    }

    /// The shard of this process that owns `copyset`, when it is not this one.
    pub(super) fn owner_elsewhere(
        &self,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
    ) -> Option<u32> {
        if opcode == protocol::LIST_COPYSETS {
            return None; // asks this shard about itself
        }
        let shards = self.mesh.borrow().as_ref().map(|m| m.shard_count())?;
        let owner = shard_of(copyset, shards);
        (owner != self.shard).then_some(owner)
    }

    /// Serves a request another shard of this process received for one of our copysets.
    pub async fn serve_forwarded(self: Rc<Self>, forwarded: Forwarded) {
        let Forwarded {
            opcode,
            copyset,
            payload,
            reply,
        } = forwarded;
        let answer = if self.owner_elsewhere(opcode, copyset).is_some() {
            // Never forwarded twice: the shards disagree on placement.
            (
                Status::Invalid(format!("copyset {copyset} is not on shard {}", self.shard)),
                Bytes::new(),
            )
        } else {
            self.handle_here(opcode, copyset, payload).await
        };
        let reply = reply.connect().await;
        // The forwarding shard may have given up; nothing to do then.
        let _ = reply.send(answer).await;
    }

    /// Sends a request to the shard that owns its copyset and waits for the answer.
    pub(super) async fn forward(
        &self,
        to: u32,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: Bytes,
    ) -> (Status, Bytes) {
        let Some(mesh) = self.mesh.borrow().clone() else {
            return (
                Status::Retry("the shard mesh is not up".into()),
                Bytes::new(),
            );
        };
        let (sender, receiver) = glommio::channels::shared_channel::new_bounded(1);
        let message = super::ShardMessage::Forward(Forwarded {
            opcode,
            copyset,
            payload,
            reply: sender,
        });
        if mesh.send(crate::shard::ShardId(to), message).await.is_err() {
            return (
                Status::Retry(format!("shard {to} is not running")),
                Bytes::new(),
            );
        }
        self.metrics
            .counter(
                "chunkserver_forwarded_requests_total",
                "Requests that reached another shard than their copyset's and were forwarded.",
                &[],
            )
            .inc();
        let receiver = receiver.connect().await;
        let answer = futures_lite::future::or(receiver.recv(), async {
            glommio::timer::sleep(FORWARD_TIMEOUT).await;
            None
        })
        .await;
        answer.unwrap_or_else(|| {
            (
                Status::Retry(format!("shard {to} did not answer a forwarded request")),
                Bytes::new(),
            )
        })
    }

    pub(super) async fn handle(
        self: &Rc<Self>,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: Bytes,
    ) -> (Status, Bytes) {
        if let Some(owner) = self.owner_elsewhere(opcode, copyset) {
            return self.forward(owner, opcode, copyset, payload).await;
        }
        self.handle_here(opcode, copyset, payload).await
    }

    /// Carries out a request for a copyset of this shard, by opcode: copyset operations are
    /// answered by the shard, chunk operations are proposed to the copyset, reads are served
    /// at its read index.
    pub(super) async fn handle_here(
        self: &Rc<Self>,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: Bytes,
    ) -> (Status, Bytes) {
        match opcode {
            // The copyset operations.
            protocol::CREATE_COPYSET => match CreateCopyset::decode(&payload) {
                Ok(request) => (
                    self.create_copyset(copyset, &request.peers, request.join)
                        .await,
                    Bytes::new(),
                ),
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            protocol::TRANSFER_LEADER => self.transfer_leader(copyset, &payload),
            protocol::CHANGE_PEERS => self.change_peers(copyset, payload).await,
            protocol::DELETE_COPYSET if payload.as_ref() == protocol::DELETE_IF_STALE => {
                (self.remove_stale_copyset(copyset).await, Bytes::new())
            }
            protocol::DELETE_COPYSET => (self.delete_copyset(copyset).await, Bytes::new()),
            protocol::RESET_PEERS => match ResetPeers::decode(&payload) {
                Ok(request) => (
                    self.reset_peers_as_admin(copyset, &request).await,
                    Bytes::new(),
                ),
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            protocol::LIST_CHUNK_IMAGE => self.serve_image_list(copyset),
            protocol::READ_CHUNK_IMAGE => self.serve_image_piece(copyset, &payload).await,
            protocol::LIST_COPYSETS => self.list_copysets(),
            protocol::COPYSET_STATUS => self.copyset_status(copyset),
            // The chunk operations that change chunks.
            protocol::WRITE_CHUNK
            | protocol::DELETE_CHUNK
            | protocol::DELETE_SNAPSHOT_OR_CORRECT_SN
            | protocol::FENCE_CHUNK
            | protocol::SCRUB_CHUNK
            | protocol::REPAIR_CHUNK
            | protocol::CREATE_CLONE_CHUNK
            | protocol::PASTE_CHUNK
            | protocol::RECOVER_CHUNK
            | protocol::FLATTEN_CHUNK
            | protocol::CREATE_VOLUME
            | protocol::DELETE_VOLUME
            | protocol::PLACEMENT => self.propose_chunk_op(opcode, copyset, payload).await,
            // The reads.
            protocol::READ_SNAPSHOT => match ReadSnapshot::decode(&payload) {
                Ok(request) => self.read(copyset, ReadRequest::Snapshot(request)).await,
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            protocol::READ_CHUNK => match ReadChunk::decode(&payload) {
                Ok(request) => self.read(copyset, ReadRequest::Chunk(request)).await,
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            protocol::GET_CHUNK_INFO => self.chunk_info(&payload),
            protocol::SCRUB_RESULT => self.serve_scrub_result(copyset, &payload),
            // The placement service.
            protocol::HEARTBEAT => self.heartbeat(copyset, &payload).await,
            protocol::TOPOLOGY => self.topology(copyset).await,
            protocol::OPERATORS => self.operators(copyset, &payload),
            other => (
                Status::Invalid(format!("unknown opcode {}", other.0)),
                Bytes::new(),
            ),
        }
    }

    /// `TRANSFER_LEADER`: asks the copyset's leader to hand its leadership to the node whose
    /// id is the body.
    fn transfer_leader(self: &Rc<Self>, copyset: CopysetId, payload: &[u8]) -> (Status, Bytes) {
        let Ok(target) = <[u8; 8]>::try_from(payload) else {
            return (
                Status::Invalid("the body is a node id".into()),
                Bytes::new(),
            );
        };
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return (Status::CopysetNotFound, Bytes::new());
        };
        let result = core
            .borrow_mut()
            .transfer_leader(NodeId(u64::from_le_bytes(target)));
        self.drive(copyset, &core);
        match result {
            Ok(()) => (Status::Ok, Bytes::new()),
            Err(raftcore::RaftError::NotLeader { leader }) => (
                Status::Redirect {
                    leader: leader.map_or(0, |l| l.0),
                },
                Bytes::new(),
            ),
            Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
        }
    }

    /// `CHANGE_PEERS`: proposes the membership change the body encodes; answered once it is
    /// applied.
    async fn change_peers(self: &Rc<Self>, copyset: CopysetId, payload: Bytes) -> (Status, Bytes) {
        let change = match raftcore::ConfChange::decode(payload) {
            Ok(change) => change,
            Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
        };
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return (Status::CopysetNotFound, Bytes::new());
        };
        let (token, answer) = self.wait_token();
        core.borrow_mut().propose_conf_change(&change, token);
        self.drive(copyset, &core);
        answer.await
    }

    /// `LIST_COPYSETS`: the ids of this shard's copysets, in order.
    fn list_copysets(&self) -> (Status, Bytes) {
        let mut ids: Vec<u64> = self.copysets.borrow().keys().map(|c| c.0).collect();
        ids.sort_unstable();
        (Status::Ok, protocol::encode_copyset_list(&ids))
    }

    /// `COPYSET_STATUS`: the replica's raft state.
    fn copyset_status(&self, copyset: CopysetId) -> (Status, Bytes) {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return (Status::CopysetNotFound, Bytes::new());
        };
        let core = core.borrow();
        let raft = core.node().raft();
        let status = CopysetStatus {
            role: match core.role() {
                StateRole::Follower => 0,
                StateRole::PreCandidate => 1,
                StateRole::Candidate => 2,
                StateRole::Leader => 3,
            },
            leader: core.leader().map_or(0, |l| l.0),
            term: raft.term.0,
            commit: raft.log.committed.0,
            applied: core.applied().0,
            membership: Membership::of(core.conf_state()),
        };
        (Status::Ok, status.encode())
    }

    /// A chunk operation that changes chunks: admitted (`admit_chunk_op`), then proposed to
    /// the copyset; answered once it is applied.
    pub(super) async fn propose_chunk_op(
        self: &Rc<Self>,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: Bytes,
    ) -> (Status, Bytes) {
        let core = match self.admit_chunk_op(opcode, copyset, &payload) {
            Ok(core) => core,
            Err(refusal) => return (refusal, Bytes::new()),
        };
        let (token, answer) = self.wait_token();
        core.borrow_mut().propose(payload, token);
        self.drive(copyset, &core);
        answer.await
    }

    /// The checks a chunk operation passes before it is proposed, in this order: it is well
    /// formed (`check_chunk_op`), its copyset is on this shard, and a leader's WAL has room
    /// for it. Gives the copyset, or the status that refuses the request.
    fn admit_chunk_op(
        &self,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: &Bytes,
    ) -> Result<CopysetCell<B>, Status> {
        self.check_chunk_op(opcode, payload)?;
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Err(Status::CopysetNotFound);
        };
        let leads = core.borrow().role() == StateRole::Leader;
        if leads && !self.admits_proposal(payload.len()) {
            let wal = self.engine.wal();
            if !wal.could_admit(payload.len() as u64) {
                return Err(Status::Invalid(format!(
                    "a request of {} bytes never fits this shard's WAL ring of {} bytes beside \
                     the room raft keeps; split it, or enlarge storage.wal_size_per_shard",
                    payload.len(),
                    wal.size()
                )));
            }
            return Err(Status::Retry(
                "the WAL is full; a checkpoint is reclaiming it".into(),
            ));
        }
        if leads {
            self.check_room_for_new_chunk(opcode, payload)?;
        }
        Ok(core)
    }

    /// A leader refuses an operation that makes a new chunk when the shard is down to its
    /// reserve of free slots: applied, it would find no slot and stall the copyset on every
    /// replica (an apply cannot fail halfway), where a refusal leaves the copyset serving its
    /// existing chunks. The reserve (1/64 of the slots, at least 4) covers the new chunks of
    /// operations already proposed and followers fuller than their leader.
    fn check_room_for_new_chunk(
        &self,
        opcode: crate::net::Opcode,
        payload: &Bytes,
    ) -> Result<(), Status> {
        if opcode != protocol::WRITE_CHUNK && opcode != protocol::CREATE_CLONE_CHUNK {
            return Ok(());
        }
        let Ok(op) = ChunkOp::decode(payload) else {
            return Ok(()); // refused by check_chunk_op already
        };
        let (slots, free) = self.engine.slot_counts();
        let reserve = (slots / 64).max(4);
        if free > reserve || self.engine.has_chunk(op.chunk()) {
            return Ok(());
        }
        Err(Status::Invalid(format!(
            "no room for a new chunk: this shard has {free} of {slots} chunk slots free, \
             its reserve is {reserve} (the device is full; delete volumes or add capacity)"
        )))
    }

    /// Whether a chunk operation's body is one the copyset can take: it decodes to an
    /// operation of its opcode, the engine accepts that operation, and it fits one WAL record.
    fn check_chunk_op(&self, opcode: crate::net::Opcode, payload: &Bytes) -> Result<(), Status> {
        match ChunkOp::decode(payload) {
            Ok(op) if protocol::opcode_of(&op) == opcode => {
                if let Err(error) = self.engine.check_op(&op) {
                    return Err(Status::Invalid(error.to_string()));
                }
            }
            Ok(_) => return Err(Status::Invalid("operation does not match opcode".into())),
            Err(error) => return Err(Status::Invalid(error.to_string())),
        }
        // The entry must fit one WAL record on every replica, or its persist would
        // fail there and stall the copyset (issue 25, item 2).
        let limit = self.engine.wal().entry_limit();
        if payload.len() as u64 > limit {
            return Err(Status::Invalid(format!(
                "a request of {} bytes exceeds the largest WAL record ({limit} \
                 bytes); split it",
                payload.len()
            )));
        }
        Ok(())
    }

    /// `GET_CHUNK_INFO`: the chunk's size and sequence numbers, read from the engine at once.
    fn chunk_info(&self, payload: &[u8]) -> (Status, Bytes) {
        if payload.len() != 8 {
            return (
                Status::Invalid("chunk info body is a chunk id".into()),
                Bytes::new(),
            );
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(payload);
        match self.engine.chunk_info(ChunkId(u64::from_le_bytes(word))) {
            Ok(info) => {
                let mut body = Vec::with_capacity(33);
                body.extend_from_slice(&info.size.to_le_bytes());
                body.extend_from_slice(&info.sn.to_le_bytes());
                body.push(u8::from(info.snapshot_sn.is_some()));
                body.extend_from_slice(&info.snapshot_sn.unwrap_or(0).to_le_bytes());
                body.extend_from_slice(&info.corrected_sn.to_le_bytes());
                (Status::Ok, Bytes::from(body))
            }
            Err(error) => (status_of_storage(&error), Bytes::new()),
        }
    }

    /// A linearizable read: answered once the copyset's applied index reaches its read index
    /// (leader lease or ReadIndex).
    pub(super) async fn read(
        self: &Rc<Self>,
        copyset: CopysetId,
        request: ReadRequest,
    ) -> (Status, Bytes) {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return (Status::CopysetNotFound, Bytes::new());
        };
        let (token, answer) = self.wait_token();
        self.reads.borrow_mut().insert(token, (copyset, request));
        core.borrow_mut().read(token);
        self.drive(copyset, &core);
        answer.await
    }

    pub(super) fn wait_token(&self) -> (Token, impl std::future::Future<Output = (Status, Bytes)>) {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        // A traced request (its span is entered): its events along the copyset's path
        // belong to it.
        let span = tracing::Span::current();
        if self.trace_every.get() > 0 && !span.is_none() {
            info!(parent: &span, token, "proposed");
            self.traced.borrow_mut().insert(token, span);
        }
        let (sender, receiver) = oneshot();
        self.waiters.borrow_mut().insert(token, sender);
        (token, async move {
            receiver.await.unwrap_or((
                Status::Retry("the shard dropped the request".into()),
                Bytes::new(),
            ))
        })
    }

    pub(super) fn answer(&self, token: Token, status: Status, body: Bytes) {
        self.traced.borrow_mut().remove(&token);
        if let Some(sender) = self.waiters.borrow_mut().remove(&token) {
            sender.send((status, body));
        }
    }
}

/// Counts a service request in `chunkserver_requests_in_flight` until it is dropped: when the
/// request is answered, and also when its task is cancelled (at shutdown) before that.
struct InFlight(Rc<crate::metrics::Gauge>);

impl InFlight {
    fn new(gauge: Rc<crate::metrics::Gauge>) -> InFlight {
        gauge.add(1);
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// A request counted in flight is uncounted when its task is dropped unfinished (the
    /// gauge stayed high when shutdown cancelled a request being handled).
    #[test]
    fn a_cancelled_request_leaves_the_in_flight_gauge() {
        let gauge: Rc<crate::metrics::Gauge> = Rc::default();
        let mut request = Box::pin({
            let gauge = Rc::clone(&gauge);
            async move {
                let _counted = InFlight::new(gauge);
                futures_lite::future::pending::<()>().await;
            }
        });
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            std::task::Poll::Ready(cx.waker().clone())
        }));
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(request.as_mut().poll(&mut cx).is_pending());
        assert_eq!(gauge.get(), 1);
        drop(request);
        assert_eq!(gauge.get(), 0);
    }
}
