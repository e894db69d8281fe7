//! One shard of a running chunkserver: its storage engine, its copysets, its listeners and its
//! connections to the shards of other nodes. Everything here runs on the shard's executor; the
//! copysets' logic lives in [`CopysetCore`], and this module is the shell that carries out its
//! commands — WAL appends and syncs, chunk applies, raft messages, client answers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use raftcore::{
    ConfState, Config as RaftConfig, HardState, LogIndex, NodeId, RawNode, Snapshot, SnapshotMeta,
    StateRole, Term,
};
use tracing::{debug, error, info, warn};

use super::wire::{
    self, CopysetStatus, CreateCopyset, Membership, RaftBatch, ReadChunk, ReadSnapshot, ResetPeers,
    Status,
};
use crate::config::Endpoint;
use crate::copyset::{Action, ChunkOp, CopysetCore, Refusal, Token};
use crate::ids::{ChunkId, CopysetId};
use crate::net::queue::{oneshot, Notify, OneshotSender};
use crate::net::{Backoff, Connection, Incoming, Listener, Message, NetContext, PeerConnection};
use crate::shard::ShutdownSignal;
use crate::storage::bdev::Bdev;
use crate::storage::engine::{CopysetStorage, Recovery, ShardEngine};
use crate::storage::StorageError;

/// Where copysets live: the same rule on every node, so a sender knows the destination shard
/// from the copyset id and the destination's shard count alone.
pub fn shard_of(copyset: CopysetId, shard_count: u32) -> u32 {
    // splitmix64: a fixed, well-mixed hash (the standard library's hasher may change).
    let mut x = copyset.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % u64::from(shard_count.max(1))) as u32
}

/// What a shard knows of the cluster: every node's peer listener and shard count.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Node id → (peer endpoint, shard count).
    pub nodes: HashMap<u64, (Endpoint, u32)>,
}

impl ClusterView {
    /// The peer endpoint of the shard of `node` that owns `copyset`.
    pub fn peer_shard(&self, node: u64, copyset: CopysetId) -> Option<(Endpoint, u32)> {
        let (endpoint, shards) = self.nodes.get(&node)?;
        let shard = shard_of(copyset, *shards);
        let addr = endpoint.for_shard(shard)?;
        Some((
            Endpoint {
                transport: endpoint.transport,
                addr,
            },
            shard,
        ))
    }
}

/// A request forwarded from the shard that received it to the shard of its copyset.
pub struct Forwarded {
    /// The service opcode.
    pub opcode: crate::net::Opcode,
    /// The copyset from the frame header.
    pub copyset: CopysetId,
    /// The request body.
    pub payload: Bytes,
    /// Where the answer goes.
    pub reply: glommio::channels::shared_channel::SharedSender<(Status, Bytes)>,
}

type CounterCell = Rc<crate::metrics::Counter>;
type LatencyCell = Rc<crate::metrics::Latency>;
/// A (class, direction) or (op, result) pair of label values.
type LabelPair = (&'static str, &'static str);

/// The request path's instruments, looked up in the registry once each and kept: a lookup
/// builds and sorts label strings, which per request costs more than the counting.
#[derive(Default)]
struct HotMetrics {
    /// `requests_total` by (op, result).
    requests: RefCell<HashMap<LabelPair, CounterCell>>,
    /// `request_bytes_total` and `request_seconds` by op.
    by_op: RefCell<HashMap<&'static str, (CounterCell, LatencyCell)>>,
    /// `frames_total` and `frame_bytes_total` by (class, direction).
    frames: RefCell<HashMap<LabelPair, (CounterCell, CounterCell)>>,
    /// `requests_in_flight`.
    in_flight: std::cell::OnceCell<Rc<crate::metrics::Gauge>>,
}

/// A linearizable read waiting for its read index.
#[derive(Debug, Clone, Copy)]
enum ReadRequest {
    /// Of the chunk's current data.
    Chunk(ReadChunk),
    /// Of the chunk's version with a given sn.
    Snapshot(ReadSnapshot),
}

/// How long a forwarding shard waits for the owning shard's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Raft timings in ticks, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RaftTimings {
    /// Length of a tick.
    pub tick: Duration,
    /// Election timeout in ticks.
    pub election_ticks: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: u32,
}

#[path = "shard_install.rs"]
mod install;
pub use install::IMAGE_PIECE_BYTES;

type CopysetCell<B> = Rc<RefCell<CopysetCore<CopysetStorage<B>>>>;

/// A destination shard: (node, shard).
type Destination = (u64, u32);
/// Encoded raft messages, each with its copyset.
type RaftMessages = Vec<(u64, Bytes)>;

/// One shard's server state.
pub struct ShardServer<B: Bdev + 'static> {
    node: u64,
    shard: u32,
    engine: Rc<ShardEngine<B>>,
    cluster: ClusterView,
    timings: RaftTimings,
    net: NetContext,
    copysets: RefCell<HashMap<CopysetId, CopysetCell<B>>>,
    /// Clients waiting for a copyset's answer.
    waiters: RefCell<HashMap<Token, OneshotSender<(Status, Bytes)>>>,
    /// Reads waiting for their read index, by token.
    reads: RefCell<HashMap<Token, (CopysetId, ReadRequest)>>,
    next_token: Cell<Token>,
    /// Raft messages to send, per destination (node, shard), flushed as one frame each.
    outbox: RefCell<HashMap<Destination, RaftMessages>>,
    outbox_ready: Notify,
    peers: RefCell<HashMap<(u64, u32), Rc<PeerConnection>>>,
    /// Connections accepted from peers and clients, closed at shutdown.
    accepted: RefCell<Vec<Connection>>,
    /// Per copyset, the persists waiting behind an install or a full WAL, in ready order.
    backlog: RefCell<HashMap<CopysetId, install::Backlog>>,
    /// Copysets installing a snapshot.
    installing: RefCell<std::collections::HashSet<CopysetId>>,
    /// Seeds the copysets' election randomness.
    seed: u64,
    /// This shard's metrics: plain cells, touched only by this shard.
    metrics: crate::metrics::Registry,
    /// The request path's instruments from `metrics`, kept.
    hot: HotMetrics,
    /// One service request in this many is traced with a `request` span (0: none).
    trace_every: Cell<u64>,
    /// Service requests received, for the trace sampling.
    received: Cell<u64>,
    /// Spans of the traced requests waiting on their copyset, by token.
    traced: RefCell<HashMap<Token, tracing::Span>>,
    /// The channel mesh to the process's other shards (for forwarded requests), once set.
    mesh: RefCell<Option<Rc<crate::shard::Mesh<super::node::ShardMessage>>>>,
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// A shard server over an opened engine; `recovery` brings back its copysets.
    pub fn new(
        node: u64,
        shard: u32,
        engine: Rc<ShardEngine<B>>,
        recovery: &Recovery,
        cluster: ClusterView,
        timings: RaftTimings,
        collect_metrics: bool,
    ) -> Result<Rc<ShardServer<B>>, StorageError> {
        let server = Rc::new(ShardServer {
            node,
            shard,
            engine,
            cluster,
            timings,
            net: NetContext::default(),
            copysets: RefCell::new(HashMap::new()),
            waiters: RefCell::new(HashMap::new()),
            reads: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            outbox: RefCell::new(HashMap::new()),
            outbox_ready: Notify::new(),
            peers: RefCell::new(HashMap::new()),
            accepted: RefCell::new(Vec::new()),
            backlog: RefCell::new(HashMap::new()),
            installing: RefCell::new(std::collections::HashSet::new()),
            seed: node << 32 | u64::from(shard),
            metrics: if collect_metrics {
                crate::metrics::Registry::new(&[
                    ("node", &node.to_string()),
                    ("shard", &shard.to_string()),
                ])
            } else {
                crate::metrics::Registry::disabled()
            },
            mesh: RefCell::new(None),
            hot: HotMetrics::default(),
            trace_every: Cell::new(0),
            received: Cell::new(0),
            traced: RefCell::new(HashMap::new()),
        });
        server
            .engine
            .wal()
            .set_flush_latency(server.metrics.latency(
                "chunkserver_wal_flush_seconds",
                "Time to write and flush one WAL batch.",
                &[],
            ));
        for recovered in &recovery.copysets {
            // Raft restarts at the checkpointed applied index (the snapshot's), and hands the
            // entries above it out again, membership changes included. The membership must
            // therefore be the one as of that index — the snapshot's, which the checkpoint
            // captured together with the applied index — not the one the WAL's later
            // membership records leave: those changes are applied (and recorded) again.
            server.engine.wal().with_log_mut(recovered.copyset, |log| {
                if log.snapshot.index == recovered.applied {
                    log.conf_state = log.snapshot.conf_state.clone();
                }
            });
            server.open_copyset(recovered.copyset, recovered.applied)?;
            info!(node, shard, copyset = %recovered.copyset, applied = %recovered.applied,
                "copyset recovered");
        }
        Ok(server)
    }

    fn open_copyset(&self, copyset: CopysetId, applied: LogIndex) -> Result<(), StorageError> {
        let mut config = RaftConfig::new(NodeId(self.node));
        config.election_tick = self.timings.election_ticks;
        config.heartbeat_tick = self.timings.heartbeat_ticks;
        config.applied = applied;
        config.rng_seed = self.seed ^ copyset.0.rotate_left(17);
        // An idle group stops heartbeating after two election timeouts; any message, proposal
        // or client request wakes it (clients reaching a follower wake it too, see
        // `CopysetCore::propose`), so thousands of idle copysets cost almost nothing.
        config.quiesce_after_ticks = 2 * self.timings.election_ticks;
        // A group that loses its quorum keeps what it had not committed (live bytes in the
        // shard's WAL, moved forward at checkpoints) until it commits again: a quarter of what
        // client data may fill at once, so one such group leaves the others of the shard
        // room to write (docs/architecture.md, "WAL space").
        config.max_uncommitted_bytes = self.engine.wal().budget().largest_admissible() / 4;
        let storage = self.engine.log_storage(copyset);
        let node = RawNode::new(config, storage)
            .map_err(|e| StorageError::Copyset(copyset.0, e.to_string()))?;
        let core = CopysetCore::new(copyset, node, applied);
        self.copysets
            .borrow_mut()
            .insert(copyset, Rc::new(RefCell::new(core)));
        Ok(())
    }

    /// Runs the shard's tasks until `shutdown`: the raft clock, the outbox flusher, the
    /// checkpointer, and the listeners' accept loops.
    pub async fn run(
        self: Rc<Self>,
        peer_listener: Listener,
        client_listeners: Vec<Listener>,
        shutdown: ShutdownSignal,
    ) {
        // Chunks of a copyset whose deletion a crash interrupted.
        match self.engine.remove_orphan_chunks().await {
            Ok(0) => {}
            Ok(count) => info!(
                node = self.node,
                shard = self.shard,
                count,
                "chunks of deleted copysets removed"
            ),
            Err(error) => warn!(node = self.node, shard = self.shard, %error,
                "chunks of deleted copysets not removed"),
        }
        let mut tasks = Vec::new();
        let server = Rc::clone(&self);
        tasks.push(glommio::spawn_local(async move { server.tick_loop().await }).detach());
        let server = Rc::clone(&self);
        tasks.push(glommio::spawn_local(async move { server.flush_loop().await }).detach());
        let server = Rc::clone(&self);
        tasks.push(glommio::spawn_local(async move { server.checkpoint_loop().await }).detach());
        let listeners = std::iter::once(("peer", peer_listener))
            .chain(client_listeners.into_iter().map(|l| ("client", l)));
        for (class, listener) in listeners {
            let server = Rc::clone(&self);
            tasks.push(
                glommio::spawn_local(async move { server.accept_loop(listener, class).await })
                    .detach(),
            );
        }
        shutdown.raised().await;
        for task in tasks {
            task.cancel();
        }
        // Close every connection, both ways, so peers and clients see this node go.
        for connection in self.accepted.borrow_mut().drain(..) {
            connection.close();
        }
        for peer in self.peers.borrow().values() {
            peer.close();
        }
        // Make what was acknowledged durable before the shard goes.
        let wal = self.engine.wal();
        if let Err(error) = wal.sync(wal.appended()).await {
            warn!(node = self.node, shard = self.shard, %error, "final WAL sync failed");
        }
        info!(node = self.node, shard = self.shard, "shard stopped");
    }

    async fn tick_loop(self: Rc<Self>) {
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

    async fn checkpoint_loop(self: Rc<Self>) {
        loop {
            // A cheap check (a comparison) unless a checkpoint is due.
            glommio::timer::sleep(Duration::from_millis(20)).await;
            if let Err(error) = self.engine.maybe_checkpoint().await {
                self.stalled(None, "checkpoint failed", &error);
            }
        }
    }

    async fn flush_loop(self: Rc<Self>) {
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
                    if let Err(error) = peer.send(Message::new(wire::RAFT, copyset, frame)).await {
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

    fn peer(&self, node: u64, shard: u32) -> Option<Rc<PeerConnection>> {
        if let Some(peer) = self.peers.borrow().get(&(node, shard)) {
            return Some(Rc::clone(peer));
        }
        let (endpoint, shards) = self.cluster.nodes.get(&node)?;
        let addr = endpoint.for_shard(shard.min(shards.saturating_sub(1)))?;
        let endpoint = Endpoint {
            transport: endpoint.transport,
            addr,
        };
        let backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            attempts_max: 1,
        };
        let peer = Rc::new(PeerConnection::new(endpoint, self.net.clone(), backoff));
        self.peers
            .borrow_mut()
            .insert((node, shard), Rc::clone(&peer));
        Some(peer)
    }

    /// Traces one service request in `every` with a `request` span (0: none).
    pub fn set_trace_every(&self, every: u64) {
        self.trace_every.set(every);
    }

    async fn accept_loop(self: Rc<Self>, listener: Listener, class: &'static str) {
        loop {
            match listener.accept().await {
                Ok(connection) => {
                    let server = Rc::clone(&self);
                    server
                        .metrics
                        .counter(
                            "chunkserver_connections_accepted_total",
                            "Connections accepted, by class (peer or client listener).",
                            &[("class", class)],
                        )
                        .inc();
                    glommio::spawn_local(async move {
                        server.serve_connection(connection, class).await
                    })
                    .detach();
                }
                Err(error) => {
                    warn!(node = self.node, shard = self.shard, %error, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn serve_connection(self: Rc<Self>, connection: Connection, class: &'static str) {
        // Remembered so that shutdown closes it (the peer then sees the node go, as it would
        // if the process exited); closed ones are dropped from the list as new ones arrive.
        {
            let mut accepted = self.accepted.borrow_mut();
            accepted.retain(|c| !c.is_closed());
            accepted.push(connection.clone());
        }
        while let Some(incoming) = connection.next_incoming().await {
            let server = Rc::clone(&self);
            glommio::spawn_local(async move { server.serve_request(incoming, class).await })
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

    async fn serve_request(self: Rc<Self>, incoming: Incoming, class: &'static str) {
        use tracing::Instrument;
        let opcode = incoming.message.opcode;
        let copyset = CopysetId(incoming.message.copyset);
        let payload = incoming.message.payload.clone();
        self.count_frame(class, "in", payload.len());
        if opcode == wire::RAFT {
            self.receive_raft(&payload);
            return;
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
        in_flight.add(1);
        let seen = self.received.get() + 1;
        self.received.set(seen);
        let every = self.trace_every.get();
        let (status, body) = if every > 0 && seen % every == 0 {
            let span = tracing::info_span!(
                "request",
                node = self.node,
                shard = self.shard,
                copyset = copyset.0,
                op = wire::opcode_name(opcode),
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
        in_flight.add(-1);
        self.count_request(
            opcode,
            &status,
            request_bytes + body.len() as u64,
            began.elapsed(),
        );
        if incoming.expects_response() {
            let response = Message::new(opcode, copyset.0, wire::encode_response(&status, &body));
            let len = response.payload.len();
            match incoming.respond(response).await {
                Ok(()) => self.count_frame(class, "out", len),
                Err(error) => debug!(%error, "response not sent"),
            }
        }
    }

    /// Counts one frame of `bytes` payload bytes on a connection of `class`, `direction` in
    /// or out.
    fn count_frame(&self, class: &'static str, direction: &'static str, bytes: usize) {
        let mut frames = self.hot.frames.borrow_mut();
        let (count, total) = frames.entry((class, direction)).or_insert_with(|| {
            let labels = [("class", class), ("direction", direction)];
            (
                self.metrics.counter(
                    "chunkserver_frames_total",
                    "Frames received and sent, by connection class and direction.",
                    &labels,
                ),
                self.metrics.counter(
                    "chunkserver_frame_bytes_total",
                    "Payload bytes of those frames.",
                    &labels,
                ),
            )
        });
        count.inc();
        total.add(bytes as u64);
    }

    fn count_request(
        &self,
        opcode: crate::net::Opcode,
        status: &Status,
        bytes: u64,
        latency: Duration,
    ) {
        let op = wire::opcode_name(opcode);
        let result = status.name();
        self.hot
            .requests
            .borrow_mut()
            .entry((op, result))
            .or_insert_with(|| {
                self.metrics.counter(
                    "chunkserver_requests_total",
                    "Client requests answered, by operation and result.",
                    &[("op", op), ("result", result)],
                )
            })
            .inc();
        let mut by_op = self.hot.by_op.borrow_mut();
        let (total, seconds) = by_op.entry(op).or_insert_with(|| {
            (
                self.metrics.counter(
                    "chunkserver_request_bytes_total",
                    "Request and response payload bytes.",
                    &[("op", op)],
                ),
                self.metrics.latency(
                    "chunkserver_request_seconds",
                    "Time from a request's arrival to its answer.",
                    &[("op", op)],
                ),
            )
        });
        total.add(bytes);
        seconds.record(latency);
    }

    /// This shard's metrics, with the gauges read now.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let copysets = self.copysets.borrow();
        let leaders = copysets
            .values()
            .filter(|c| c.borrow().role() == StateRole::Leader)
            .count();
        self.metrics
            .gauge("chunkserver_copysets", "Copysets on the shard.", &[])
            .set(copysets.len() as i64);
        self.metrics
            .gauge(
                "chunkserver_copysets_leading",
                "Copysets this shard leads.",
                &[],
            )
            .set(leaders as i64);
        let wal = self.engine.wal().stats();
        self.metrics
            .gauge(
                "chunkserver_wal_batches",
                "WAL batches written (one write and one flush each).",
                &[],
            )
            .set(wal.batches as i64);
        self.metrics
            .gauge("chunkserver_wal_records", "WAL records appended.", &[])
            .set(wal.records as i64);
        let reactor = glommio::executor().executor_stats();
        self.metrics
            .gauge(
                "chunkserver_reactor_busy_ms",
                "Milliseconds the shard's executor spent running tasks (monotonic).",
                &[],
            )
            .set(reactor.executor_runtime().as_millis() as i64);
        self.metrics
            .gauge(
                "chunkserver_reactor_tasks",
                "Tasks the shard's executor ran (monotonic).",
                &[],
            )
            .set(reactor.tasks_executed() as i64);
        self.metrics
            .gauge(
                "chunkserver_dma_pool_bytes_in_use",
                "Bytes of the shard's DMA buffer pool handed out.",
                &[],
            )
            .set(self.engine.bdev().pool().in_use() as i64);
        let (made, failed) = self
            .peers
            .borrow()
            .values()
            .map(|p| p.dials())
            .fold((0, 0), |(m, f), (dm, df)| (m + dm, f + df));
        self.metrics
            .gauge(
                "chunkserver_peer_connects",
                "Connections this shard made to other nodes' shards (monotonic; beyond one per \
                 destination, reconnects).",
                &[],
            )
            .set(made as i64);
        self.metrics
            .gauge(
                "chunkserver_peer_connect_failures",
                "Dials to other nodes' shards that failed (monotonic).",
                &[],
            )
            .set(failed as i64);
        for (id, core) in copysets.iter() {
            let core = core.borrow();
            let raft = core.node().raft();
            let label = id.0.to_string();
            let labels = [("copyset", label.as_str())];
            let role = match core.role() {
                StateRole::Follower => 0,
                StateRole::PreCandidate => 1,
                StateRole::Candidate => 2,
                StateRole::Leader => 3,
            };
            let lag = if core.role() == StateRole::Leader {
                let last = raft.log.last_index();
                core.conf_state()
                    .voters
                    .iter()
                    .chain(&core.conf_state().learners)
                    .filter_map(|n| raft.progress(*n))
                    .map(|p| last.0.saturating_sub(p.matched.0))
                    .max()
                    .unwrap_or(0)
            } else {
                0
            };
            for (name, help, value) in [
                (
                    "chunkserver_copyset_role",
                    "0 follower, 1 pre-candidate, 2 candidate, 3 leader.",
                    role,
                ),
                (
                    "chunkserver_copyset_term",
                    "The replica's raft term.",
                    raft.term.0,
                ),
                (
                    "chunkserver_copyset_commit_index",
                    "The replica's commit index.",
                    raft.log.committed.0,
                ),
                (
                    "chunkserver_copyset_applied_index",
                    "Entries applied to the chunks.",
                    core.applied().0,
                ),
                (
                    "chunkserver_copyset_follower_lag",
                    "On a leader: entries the furthest follower is behind its log.",
                    lag,
                ),
            ] {
                self.metrics
                    .gauge(name, help, &labels)
                    .set(value.min(i64::MAX as u64) as i64);
            }
        }
        self.metrics
            .gauge(
                "chunkserver_wal_bytes",
                "Bytes written to the WAL ring.",
                &[],
            )
            .set(wal.bytes as i64);
        self.metrics.snapshot()
    }

    /// The copysets' raft state, for `/status`.
    pub fn status_json(&self) -> Vec<serde_json::Value> {
        let copysets = self.copysets.borrow();
        let mut ids: Vec<&CopysetId> = copysets.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| {
                let core = copysets.get(id)?.borrow();
                let raft = core.node().raft();
                let wal = self.engine.wal();
                let (log_first, log_applied, first_needed, log_last) = wal
                    .with_log(*id, |log| {
                        (
                            raftcore::LogStorage::first_index(log).map_or(0, |i| i.0),
                            log.applied.0,
                            log.first_needed_lsn(log.applied),
                            raftcore::LogStorage::last_index(log).map_or(0, |i| i.0),
                        )
                    })
                    .unwrap_or((0, 0, None, 0));
                Some(serde_json::json!({
                    "wal": {
                        "head": wal.head(),
                        "durable": wal.durable(),
                        "used": wal.used(),
                        "size": wal.size(),
                        "log_first": log_first,
                        "log_applied": log_applied,
                        "first_needed_lsn": first_needed,
                        "log_last": log_last,
                    },
                    "copyset": id.0,
                    "shard": self.shard,
                    "role": format!("{:?}", core.role()).to_lowercase(),
                    "leader": core.leader().map_or(0, |l| l.0),
                    "term": raft.term.0,
                    "commit": raft.log.committed.0,
                    "applied": core.applied().0,
                    "voters": core.conf_state().voters.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "voters_outgoing": core.conf_state().voters_outgoing.iter().map(|n| n.0)
                        .collect::<Vec<_>>(),
                    "learners": core.conf_state().learners.iter().map(|n| n.0)
                        .collect::<Vec<_>>(),
                }))
            })
            .collect()
    }

    fn receive_raft(self: &Rc<Self>, payload: &Bytes) {
        let batch = match RaftBatch::decode(payload) {
            Ok(batch) => batch,
            Err(error) => {
                warn!(node = self.node, shard = self.shard, %error, "bad raft batch dropped");
                return;
            }
        };
        for (copyset, bytes) in batch.messages {
            let copyset = CopysetId(copyset);
            let message = match raftcore::decode(bytes) {
                Ok(message) => message,
                Err(error) => {
                    warn!(%copyset, %error, "undecodable raft message dropped");
                    continue;
                }
            };
            let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
                debug!(%copyset, "raft message for a copyset this shard does not have");
                continue;
            };
            if !self.admits_append(&core, &message) {
                continue;
            }
            if let Err(error) = core.borrow_mut().step(message) {
                debug!(%copyset, %error, "raft message refused");
            }
            self.drive(copyset, &core);
        }
    }

    /// Whether the WAL admits the client data an append from the leader carries (entries
    /// past this replica's log; a new leader's no-op and membership changes are raft's own
    /// and always pass). A deferred append is dropped before raft sees it, like a lost
    /// message: the leader sends it again, and no persist of this copyset ever waits behind
    /// it, so its votes and acknowledgements keep flowing (docs/architecture.md, "WAL space").
    fn admits_append(&self, core: &CopysetCell<B>, message: &raftcore::Message) -> bool {
        if message.msg_type != raftcore::MessageType::Append || message.entries.is_empty() {
            return true;
        }
        let limit = self.engine.wal().entry_limit();
        if let Some(entry) = message.entries.iter().find(|e| e.data.len() as u64 > limit) {
            // A leader with a larger ring sent an entry this ring cannot hold in one record:
            // persisting it would fail and stall the copyset here. Left to raft, this replica
            // falls behind and catches up by a snapshot install.
            warn!(node = self.node, copyset = %core.borrow().id(), index = %entry.index,
                bytes = entry.data.len(), limit, "raft entry larger than this WAL's records; dropped");
            return false;
        }
        let last = core.borrow().node().raft().log.last_index();
        let incoming: u64 = message
            .entries
            .iter()
            .filter(|e| e.index > last && e.kind == raftcore::EntryKind::Normal)
            .map(|e| e.data.len() as u64)
            .sum();
        if incoming == 0 || self.engine.wal().admits(incoming) {
            return true;
        }
        self.metrics
            .counter(
                "chunkserver_wal_deferred_appends_total",
                "Appends from a leader dropped because the WAL kept its room for raft's own \
                 records; the leader sends them again.",
                &[],
            )
            .inc();
        false
    }

    /// Whether the WAL admits a client proposal of `bytes` now; counts a refusal.
    fn admits_proposal(&self, bytes: usize) -> bool {
        if self.engine.wal().admits(bytes as u64) {
            return true;
        }
        self.metrics
            .counter(
                "chunkserver_wal_refused_writes_total",
                "Client writes answered `retry` because the WAL kept its room for raft's own \
                 records (back-pressure until a checkpoint reclaims the ring).",
                &[],
            )
            .inc();
        false
    }

    /// Hands the shard its ends of the channel mesh, through which requests that reach the
    /// wrong shard go to their copyset's.
    pub fn set_mesh(&self, mesh: Rc<crate::shard::Mesh<super::node::ShardMessage>>) {
        *self.mesh.borrow_mut() = Some(mesh);
    }

    /// The shard of this process that owns `copyset`, when it is not this one.
    fn owner_elsewhere(&self, opcode: crate::net::Opcode, copyset: CopysetId) -> Option<u32> {
        if opcode == wire::LIST_COPYSETS {
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
    async fn forward(
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
        let message = super::node::ShardMessage::Forward(Forwarded {
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

    async fn handle(
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

    async fn handle_here(
        self: &Rc<Self>,
        opcode: crate::net::Opcode,
        copyset: CopysetId,
        payload: Bytes,
    ) -> (Status, Bytes) {
        match opcode {
            wire::CREATE_COPYSET => match CreateCopyset::decode(&payload) {
                Ok(request) => (
                    self.create_copyset(copyset, &request.peers, request.join)
                        .await,
                    Bytes::new(),
                ),
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            wire::TRANSFER_LEADER => {
                let Ok(target) = <[u8; 8]>::try_from(&payload[..]) else {
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
            wire::CHANGE_PEERS => {
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
            wire::DELETE_COPYSET => (self.delete_copyset(copyset).await, Bytes::new()),
            wire::RESET_PEERS => match ResetPeers::decode(&payload) {
                Ok(request) => (
                    self.reset_peers(copyset, &request.peers).await,
                    Bytes::new(),
                ),
                Err(error) => (Status::Invalid(error.to_string()), Bytes::new()),
            },
            wire::LIST_CHUNK_IMAGE => self.serve_image_list(copyset),
            wire::READ_CHUNK_IMAGE => self.serve_image_piece(copyset, &payload).await,
            wire::LIST_COPYSETS => {
                let mut ids: Vec<u64> = self.copysets.borrow().keys().map(|c| c.0).collect();
                ids.sort_unstable();
                (Status::Ok, wire::encode_copyset_list(&ids))
            }
            wire::COPYSET_STATUS => {
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
            wire::WRITE_CHUNK
            | wire::DELETE_CHUNK
            | wire::DELETE_SNAPSHOT_OR_CORRECT_SN
            | wire::CREATE_CLONE_CHUNK
            | wire::PASTE_CHUNK
            | wire::RECOVER_CHUNK
            | wire::FLATTEN_CHUNK
            | wire::CREATE_VOLUME
            | wire::DELETE_VOLUME => {
                match ChunkOp::decode(&payload) {
                    Ok(op) if wire::opcode_of(&op) == opcode => {
                        if let Err(error) = self.engine.check_op(&op) {
                            return (Status::Invalid(error.to_string()), Bytes::new());
                        }
                    }
                    Ok(_) => {
                        return (
                            Status::Invalid("operation does not match opcode".into()),
                            Bytes::new(),
                        )
                    }
                    Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
                }
                // The entry must fit one WAL record on every replica, or its persist would
                // fail there and stall the copyset (issue 25, item 2).
                let limit = self.engine.wal().entry_limit();
                if payload.len() as u64 > limit {
                    return (
                        Status::Invalid(format!(
                            "a request of {} bytes exceeds the largest WAL record ({limit} \
                             bytes); split it",
                            payload.len()
                        )),
                        Bytes::new(),
                    );
                }
                let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
                    return (Status::CopysetNotFound, Bytes::new());
                };
                let leads = core.borrow().role() == StateRole::Leader;
                if leads && !self.admits_proposal(payload.len()) {
                    let wal = self.engine.wal();
                    if !wal.could_admit(payload.len() as u64) {
                        return (
                            Status::Invalid(format!(
                                "a request of {} bytes never fits this shard's WAL ring of {} \
                                 bytes beside the room raft keeps; split it, or enlarge \
                                 storage.wal_size_per_shard",
                                payload.len(),
                                wal.size()
                            )),
                            Bytes::new(),
                        );
                    }
                    return (
                        Status::Retry("the WAL is full; a checkpoint is reclaiming it".into()),
                        Bytes::new(),
                    );
                }
                let (token, answer) = self.wait_token();
                core.borrow_mut().propose(payload, token);
                self.drive(copyset, &core);
                answer.await
            }
            wire::READ_SNAPSHOT => {
                let request = match ReadSnapshot::decode(&payload) {
                    Ok(request) => request,
                    Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
                };
                self.read(copyset, ReadRequest::Snapshot(request)).await
            }
            wire::READ_CHUNK => {
                let request = match ReadChunk::decode(&payload) {
                    Ok(request) => request,
                    Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
                };
                self.read(copyset, ReadRequest::Chunk(request)).await
            }
            wire::GET_CHUNK_INFO => {
                if payload.len() != 8 {
                    return (
                        Status::Invalid("chunk info body is a chunk id".into()),
                        Bytes::new(),
                    );
                }
                let mut word = [0u8; 8];
                word.copy_from_slice(&payload);
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
            other => (
                Status::Invalid(format!("unknown opcode {}", other.0)),
                Bytes::new(),
            ),
        }
    }

    /// A linearizable read: answered once the copyset's applied index reaches its read index
    /// (leader lease or ReadIndex).
    async fn read(self: &Rc<Self>, copyset: CopysetId, request: ReadRequest) -> (Status, Bytes) {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return (Status::CopysetNotFound, Bytes::new());
        };
        let (token, answer) = self.wait_token();
        self.reads.borrow_mut().insert(token, (copyset, request));
        core.borrow_mut().read(token);
        self.drive(copyset, &core);
        answer.await
    }

    fn wait_token(&self) -> (Token, impl std::future::Future<Output = (Status, Bytes)>) {
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

    fn answer(&self, token: Token, status: Status, body: Bytes) {
        self.traced.borrow_mut().remove(&token);
        if let Some(sender) = self.waiters.borrow_mut().remove(&token) {
            sender.send((status, body));
        }
    }

    /// Creates a copyset with `peers` as its first voters: a bootstrap snapshot (index 1,
    /// term 1) and hard state in the WAL, made durable before the copyset starts. With
    /// `join`, this node need not be among `peers` (the copyset's original voters): the replica
    /// starts from the same bootstrap as theirs, takes the leader's log from index 2 once a
    /// peer change adds it, and cannot campaign until it applies its own addition.
    async fn create_copyset(&self, copyset: CopysetId, peers: &[NodeId], join: bool) -> Status {
        if copyset.0 == 0 {
            return Status::Invalid("copyset id 0 is reserved".into());
        }
        if !join && !peers.contains(&NodeId(self.node)) {
            return Status::Invalid(format!(
                "the peers do not include this node ({})",
                self.node
            ));
        }
        if self.copysets.borrow().contains_key(&copyset) {
            return Status::Ok;
        }
        let conf_state = ConfState {
            voters: peers.iter().copied().collect(),
            ..ConfState::default()
        };
        let meta = SnapshotMeta {
            index: LogIndex(1),
            term: Term(1),
            conf_state,
        };
        let wal = self.engine.wal();
        if peers.is_empty() {
            // A joining replica without the bootstrap: an empty log (recorded, so a restart
            // keeps the replica), and no membership until the leader's snapshot brings it.
            let written = wal.set_hard_state(copyset, HardState::default());
            return self
                .open_created(
                    copyset,
                    written,
                    LogIndex(0),
                    "joining replica created empty",
                )
                .await;
        }
        let written = wal
            .install_snapshot(
                copyset,
                Snapshot {
                    meta,
                    data: Bytes::new(),
                },
            )
            .and_then(|_| {
                wal.set_hard_state(
                    copyset,
                    HardState {
                        term: Term(1),
                        vote: None,
                        commit: LogIndex(1),
                    },
                )
            });
        self.open_created(copyset, written, LogIndex(1), "copyset created")
            .await
    }

    /// Makes a new copyset's first WAL records durable (`written`: where they end), then
    /// starts its raft at `applied` — unless another request created it while the WAL synced.
    async fn open_created(
        &self,
        copyset: CopysetId,
        written: Result<u64, StorageError>,
        applied: LogIndex,
        what: &str,
    ) -> Status {
        let synced = match written {
            Ok(lsn) => self.engine.wal().sync(lsn).await,
            Err(error) => Err(error),
        };
        if let Err(error) = synced {
            return status_of_storage(&error);
        }
        if self.copysets.borrow().contains_key(&copyset) {
            return Status::Ok;
        }
        match self.open_copyset(copyset, applied) {
            Ok(()) => {
                info!(node = self.node, shard = self.shard, %copyset, "{what}");
                Status::Ok
            }
            Err(error) => status_of_storage(&error),
        }
    }

    /// Waits (bounded) until the copyset has no apply in flight and no install running, so
    /// that nothing writes its chunks behind the caller's back.
    async fn quiet(&self, copyset: CopysetId, core: &CopysetCell<B>) -> Result<(), Status> {
        let started = std::time::Instant::now();
        loop {
            let busy =
                core.borrow().applies_in_flight() || self.backlog.borrow().contains_key(&copyset);
            if !busy {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(Status::Retry(
                    "the copyset is applying or installing a snapshot".into(),
                ));
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Deletes this node's replica of `copyset` (CopysetService delete): raft stops, a WAL
    /// record makes the deletion durable, then the chunks go.
    async fn delete_copyset(&self, copyset: CopysetId) -> Status {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Status::CopysetNotFound;
        };
        if let Err(status) = self.quiet(copyset, &core).await {
            return status;
        }
        if self.copysets.borrow_mut().remove(&copyset).is_none() {
            return Status::CopysetNotFound; // deleted meanwhile
        }
        // Reads waiting on this copyset are answered now; proposals are answered by their
        // clients' timeouts (the core that held their tokens is gone).
        let tokens: Vec<Token> = self
            .reads
            .borrow()
            .iter()
            .filter(|(_, (c, _))| *c == copyset)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            self.reads.borrow_mut().remove(&token);
            self.answer(token, Status::CopysetNotFound, Bytes::new());
        }
        match self.engine.remove_copyset(copyset).await {
            Ok(()) => {
                info!(node = self.node, shard = self.shard, %copyset, "copyset deleted");
                Status::Ok
            }
            Err(error) => {
                if error.is_device_failure() {
                    self.stalled(Some(copyset), "copyset deletion failed", &error);
                }
                error!(%copyset, %error, "copyset deletion failed");
                status_of_storage(&error)
            }
        }
    }

    /// Forces this replica's membership to `peers` (CliService reset peers), for a copyset
    /// whose quorum is gone for good: the membership is recorded with the applied index and
    /// checkpointed, and raft restarts on it. Entries above the applied index that the log
    /// still holds are applied again, membership changes among them.
    async fn reset_peers(&self, copyset: CopysetId, peers: &[NodeId]) -> Status {
        if !peers.contains(&NodeId(self.node)) {
            return Status::Invalid(format!(
                "the new voters do not include this node ({})",
                self.node
            ));
        }
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Status::CopysetNotFound;
        };
        if let Err(status) = self.quiet(copyset, &core).await {
            return status;
        }
        let applied = core.borrow().applied();
        let conf_state = ConfState {
            voters: peers.iter().copied().collect(),
            ..ConfState::default()
        };
        self.engine.set_applied(copyset, applied);
        let wal = self.engine.wal();
        let written = match wal.set_conf_state(copyset, conf_state.clone()) {
            Ok(lsn) => wal.sync(lsn).await,
            Err(error) => Err(error),
        };
        // The checkpoint captures the membership with the applied index, which is what a
        // restart believes (see `new`).
        let result = match written {
            Ok(()) => self.engine.checkpoint().await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            return status_of_storage(&error);
        }
        self.copysets.borrow_mut().remove(&copyset);
        match self.open_copyset(copyset, applied) {
            Ok(()) => {
                warn!(node = self.node, %copyset, voters = ?conf_state.voters,
                    "membership reset without consensus");
                Status::Ok
            }
            Err(error) => status_of_storage(&error),
        }
    }

    /// Carries out every command the copyset has.
    fn drive(self: &Rc<Self>, copyset: CopysetId, core: &CopysetCell<B>) {
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
                Action::Send(message) => {
                    let to = message.to.0;
                    let Some((_, shard)) = self.cluster.peer_shard(to, copyset) else {
                        debug!(%copyset, to, "raft message to an unknown node dropped");
                        continue;
                    };
                    let bytes = raftcore::encode_to_bytes(&message);
                    self.outbox
                        .borrow_mut()
                        .entry((to, shard))
                        .or_default()
                        .push((copyset.0, bytes));
                    self.outbox_ready.notify();
                }
                Action::Persist {
                    number,
                    snapshot,
                    entries,
                    hard_state,
                } => {
                    let persist = install::PendingPersist {
                        number,
                        snapshot,
                        entries,
                        hard_state,
                    };
                    let Some(persist) = self.queue_in_backlog(copyset, persist) else {
                        continue; // an install or a full WAL holds earlier ones: in order
                    };
                    if persist.snapshot.is_some() {
                        self.start_install(copyset, core, persist);
                        continue;
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
                            continue;
                        }
                        Err(error) => {
                            self.stalled(Some(copyset), "WAL append failed", &error);
                            continue;
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
                Action::Apply { index, op, token } => {
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
                        let result = apply_op(&engine, copyset, op, index).await;
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
                            server.answer(token, status, Bytes::new());
                        }
                        server.drive(copyset, &core);
                    })
                    .detach();
                }
                Action::Refuse { token, refusal } => {
                    self.reads.borrow_mut().remove(&token);
                    let status = match refusal {
                        Refusal::NotLeader { leader } => Status::Redirect {
                            leader: leader.map_or(0, |l| l.0),
                        },
                        Refusal::Dropped => {
                            Status::Retry("replaced by a new leader's entry".into())
                        }
                        Refusal::Invalid(reason) => Status::Invalid(reason),
                        Refusal::Busy(reason) => Status::Retry(reason),
                    };
                    self.answer(token, status, Bytes::new());
                }
                Action::Read { token } => {
                    let Some((_, request)) = self.reads.borrow_mut().remove(&token) else {
                        continue;
                    };
                    let engine = Rc::clone(&self.engine);
                    let server = Rc::clone(self);
                    glommio::spawn_local(async move {
                        let len = match request {
                            ReadRequest::Chunk(r) => r.len,
                            ReadRequest::Snapshot(r) => r.len,
                        };
                        let result = match request {
                            ReadRequest::Chunk(r) => {
                                engine.read_chunk(r.chunk, r.offset, u64::from(r.len)).await
                            }
                            ReadRequest::Snapshot(r) => {
                                engine
                                    .read_snapshot(r.chunk, r.sn, r.offset, u64::from(r.len))
                                    .await
                            }
                        };
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
                Action::ConfChanged {
                    index,
                    conf_state,
                    tokens,
                } => {
                    // Everything up to `index` is applied: the membership and the applied
                    // index go together, so a restart's `initial_state()` is the membership
                    // as of its applied index (raft does not hand these entries out again
                    // once the applied index passes them).
                    info!(node = self.node, %copyset, %index, voters = ?conf_state.voters,
                        outgoing = ?conf_state.voters_outgoing, "membership changed");
                    self.engine.set_applied(copyset, index);
                    let membership = Membership::of(&conf_state).encode();
                    let wal = self.engine.wal();
                    let lsn = match wal.set_conf_state(copyset, conf_state) {
                        Ok(lsn) => lsn,
                        Err(error) => {
                            if error.is_device_failure() {
                                self.stalled(Some(copyset), "membership not recorded", &error);
                            }
                            error!(%copyset, %error, "membership not recorded in the WAL");
                            for token in tokens {
                                self.answer(token, status_of_storage(&error), Bytes::new());
                            }
                            continue;
                        }
                    };
                    let engine = Rc::clone(&self.engine);
                    let server = Rc::clone(self);
                    glommio::spawn_local(async move {
                        let status = match engine.wal().sync(lsn).await {
                            Ok(()) => Status::Ok,
                            Err(error) => {
                                server.stalled(
                                    Some(copyset),
                                    "WAL sync of the membership failed",
                                    &error,
                                );
                                status_of_storage(&error)
                            }
                        };
                        for token in tokens {
                            server.answer(token, status.clone(), membership.clone());
                        }
                    })
                    .detach();
                }
                Action::RoleChanged { role, leader } => {
                    info!(node = self.node, %copyset, ?role, leader = leader.map(|l| l.0), "role changed");
                }
            }
        }
    }
}

/// Applies one committed chunk operation of `copyset` at `index` to the engine.
async fn apply_op<B: Bdev>(
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
            let content = read_whole_chunk(engine, table).await?;
            let chunk_size = engine.layout().geometry.chunk_size;
            let planned = crate::volume_table::plan_create(
                &content,
                &name,
                size,
                CopysetId(data_copyset),
                chunk_size,
            );
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
        ChunkOp::VolumeDelete { table, name } => {
            let content = read_whole_chunk(engine, table).await?;
            let (record_index, _) =
                crate::volume_table::plan_delete(&content, &name).map_err(|e| {
                    StorageError::Conflict {
                        chunk: table,
                        reason: e.to_string(),
                    }
                })?;
            let offset = (record_index * crate::volume_table::RECORD_LEN) as u64;
            let zeroes = Bytes::from(vec![0u8; crate::volume_table::RECORD_LEN]);
            engine
                .write_chunk_bytes(copyset, table, offset, zeroes, 1, index)
                .await
        }
    }
}

/// A whole chunk's bytes; zeroes when it does not exist.
async fn read_whole_chunk<B: Bdev>(
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

impl<B: Bdev + 'static> ShardServer<B> {
    /// Reports a failure that a copyset (or, for `None`, the shard) cannot go on from. A
    /// device failure ends the process (fail-stop, see `fail_stop`); anything else is logged
    /// and leaves the copyset where it is.
    pub(super) fn stalled(&self, copyset: Option<CopysetId>, what: &str, error: &StorageError) {
        if error.is_device_failure() {
            super::fail_stop(self.node, self.shard, what, error);
        }
        match copyset {
            Some(copyset) => error!(node = self.node, %copyset, %error, "{what}; copyset stalls"),
            None => error!(node = self.node, shard = self.shard, %error, "{what}"),
        }
    }
}

fn status_of_storage(error: &StorageError) -> Status {
    match error {
        StorageError::ChunkNotFound(_) => Status::ChunkNotFound,
        StorageError::BackwardRequest { .. } => Status::BackwardSn,
        // Refusals decided by the chunk's state: the same on every replica, so the entry
        // counts as applied (it changed nothing) and the copyset moves on.
        StorageError::Unaligned { .. }
        | StorageError::OutOfRange { .. }
        | StorageError::Conflict { .. }
        | StorageError::SnapshotNotFound { .. } => Status::Invalid(error.to_string()),
        other => Status::Io(other.to_string()),
    }
}
