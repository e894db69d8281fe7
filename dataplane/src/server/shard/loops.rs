//! The shard's background loops (raft ticks, checkpoints, the outbox) and its listeners.

use std::rc::Rc;
use std::time::Duration;

use tracing::{debug, warn};

use super::{CopysetCell, Destination, RaftMessages, ShardServer};
use crate::ids::CopysetId;
use crate::net::{Connection, Listener, Message};
use crate::protocol::{self, RaftBatch};
use crate::storage::bdev::Bdev;

impl<B: Bdev + 'static> ShardServer<B> {
    pub(super) async fn tick_loop(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(self.timings.tick).await;
            // Quiescent groups are skipped without being touched further: thousands of idle
            // copysets cost one flag check each per tick.
            let awake: Vec<(CopysetId, CopysetCell<B>)> = self
                .copysets
                .borrow()
                .iter()
                .filter(|(_, c)| !c.borrow().is_quiescent())
                .map(|(id, c)| (*id, Rc::clone(c)))
                .collect();
            for (id, core) in awake {
                core.borrow_mut().tick();
                self.drive(id, &core);
            }
        }
    }

    pub(super) async fn checkpoint_loop(self: Rc<Self>) {
        loop {
            // A cheap check (a comparison) unless a checkpoint is due.
            glommio::timer::sleep(Duration::from_millis(20)).await;
            self.pin_catch_up();
            if let Err(error) = self.engine.maybe_checkpoint().await {
                self.stalled(None, "checkpoint failed", &error);
            }
        }
    }

    /// For each copyset this shard leads, pins in its log the entries its furthest-behind
    /// active follower (or one being sent a snapshot) needs next, up to `MAX_CATCH_UP` entries
    /// behind the applied index: without the pin a checkpoint compacts them within seconds
    /// under load, and a follower that took a snapshot longer than that to install is sent
    /// another one, for ever (found by scripts/bench-recovery).
    fn pin_catch_up(&self) {
        const MAX_CATCH_UP: u64 = 65_536;
        for (copyset, core) in self.copysets.borrow().iter() {
            let core = core.borrow();
            let mut pin = raftcore::LogIndex(0);
            if core.role() == raftcore::StateRole::Leader {
                let raft = core.node().raft();
                let behind = core
                    .conf_state()
                    .voters
                    .iter()
                    .chain(core.conf_state().learners.iter())
                    .filter(|id| id.0 != self.node)
                    .filter_map(|id| raft.progress(*id))
                    .filter(|p| {
                        p.recent_active || p.state == raftcore::progress::ProgressState::Snapshot
                    })
                    .map(|p| match p.state {
                        raftcore::progress::ProgressState::Snapshot => p.pending_snapshot,
                        _ => p.matched,
                    })
                    .min();
                if let Some(needed) = behind {
                    if core.applied().0.saturating_sub(needed.0) <= MAX_CATCH_UP {
                        pin = raftcore::LogIndex(needed.0 + 1);
                    }
                }
            }
            self.engine
                .wal()
                .with_log_mut(*copyset, |log| log.retain_from = pin);
        }
    }

    pub(super) async fn flush_loop(self: Rc<Self>) {
        loop {
            self.outbox_ready.notified().await;
            let batches: Vec<(Destination, RaftMessages)> =
                self.outbox.borrow_mut().drain().collect();
            for ((node, shard), messages) in batches {
                let Some(peer) = self.peer(node, shard) else {
                    warn!(node, shard, "no address for raft peer; messages dropped");
                    continue;
                };
                // One frame per destination per flush; raft retries whatever is lost.
                let copyset = messages.first().map(|(c, _)| *c).unwrap_or(0);
                let frame = RaftBatch { messages }.encode();
                self.count_frame("peer", "out", frame.len());
                let server = Rc::clone(&self);
                glommio::spawn_local(async move {
                    if let Err(error) = peer
                        .send(Message::new(protocol::RAFT, copyset, frame))
                        .await
                    {
                        debug!(%error, "raft batch not sent");
                        server
                            .metrics
                            .counter(
                                "chunkserver_peer_send_errors_total",
                                "Raft frames to other nodes that could not be sent.",
                                &[],
                            )
                            .inc();
                    }
                })
                .detach();
            }
        }
    }

    /// Accepts connections until `shutdown`, then closes the listener and what it holds
    /// ([`Listener::close`]): a stopping node leaves no connection open and unserved.
    pub(super) async fn accept_loop(
        self: Rc<Self>,
        listener: Listener,
        class: &'static str,
        shutdown: crate::shard::ShutdownSignal,
    ) {
        loop {
            let accepted =
                futures_lite::future::or(async { Some(listener.accept().await) }, async {
                    shutdown.raised().await;
                    None
                })
                .await;
            match accepted {
                None => break,
                Some(Ok(connection)) => {
                    self.metrics
                        .counter(
                            "chunkserver_connections_accepted_total",
                            "Connections accepted, by class (peer or client listener).",
                            &[("class", class)],
                        )
                        .inc();
                    // Remembered at once, so that shutdown closes it even before its serving
                    // task first runs; closed ones are dropped from the list as new ones come.
                    {
                        let mut accepted = self.accepted.borrow_mut();
                        accepted.retain(|c| !c.is_closed());
                        accepted.push(connection.clone());
                    }
                    let server = Rc::clone(&self);
                    glommio::spawn_local(async move {
                        server.serve_connection(connection, class).await
                    })
                    .detach();
                }
                Some(Err(error)) => {
                    warn!(node = self.node, shard = self.shard, %error, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        listener.close().await;
    }

    pub(super) async fn serve_connection(
        self: Rc<Self>,
        connection: Connection,
        class: &'static str,
    ) {
        // Requests served at once on this connection, weighed by the bytes they hold and
        // will answer: a peer that sends faster than it reads the answers (pipelined reads
        // never collected) is held here, then by the bounded queues, then by TCP — never
        // by the process's memory (issue 25, item 7).
        let budget = Rc::new(glommio::sync::Semaphore::new(CONNECTION_REQUEST_BYTES));
        while let Some(incoming) = connection.next_incoming().await {
            let weight = request_weight(&incoming.message).min(CONNECTION_REQUEST_BYTES);
            let Ok(permit) = budget.acquire_static_permit(weight).await else {
                break;
            };
            let server = Rc::clone(&self);
            glommio::spawn_local(async move {
                server.serve_request(incoming, class).await;
                drop(permit);
            })
            .detach();
        }
        if let Some(reason) = connection.closed_reason() {
            debug!(connection = connection.label(), %reason, "connection closed");
            self.metrics
                .counter(
                    "chunkserver_connection_closes_total",
                    "Accepted connections that closed, by class.",
                    &[("class", class)],
                )
                .inc();
        }
    }
}

/// Bytes of requests and their answers one connection may have in service at once.
const CONNECTION_REQUEST_BYTES: u64 = 64 << 20;

/// What serving `message` holds in memory: its payload and, for a read, the bytes it answers
/// (at least a page, so that many tiny requests count too).
fn request_weight(message: &crate::net::Message) -> u64 {
    use crate::protocol::{
        ReadChunk, ReadImagePiece, ReadSnapshot, READ_CHUNK, READ_CHUNK_IMAGE, READ_SNAPSHOT,
    };
    let payload = &message.payload;
    let answer = match message.opcode {
        READ_CHUNK => ReadChunk::decode(payload).map_or(0, |r| r.len),
        READ_SNAPSHOT => ReadSnapshot::decode(payload).map_or(0, |r| r.len),
        READ_CHUNK_IMAGE => ReadImagePiece::decode(payload).map_or(0, |r| r.len),
        _ => 0,
    };
    (payload.len() as u64 + u64::from(answer)).max(4096)
}
