//! One shard of a running chunkserver: its storage engine, its copysets, its listeners and its
//! connections to the shards of other nodes. Everything here runs on the shard's executor; the
//! copysets' logic lives in [`CopysetCore`], and this module is the shell that carries out its
//! commands — WAL appends and syncs, chunk applies, raft messages, client answers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use raftcore::{Config as RaftConfig, LogIndex, NodeId, RawNode};
use tracing::{error, info, warn};

use crate::config::Endpoint;
use crate::copyset::{CopysetCore, Token};
use crate::ids::CopysetId;
use crate::net::queue::{Notify, OneshotSender};
use crate::net::{Backoff, Connection, Listener, NetContext, PeerConnection};
use crate::protocol::{shard_of, ReadChunk, ReadSnapshot, Status};
use crate::shard::ShutdownSignal;
use crate::storage::bdev::Bdev;
use crate::storage::engine::{CopysetStorage, Recovery, ShardEngine};
use crate::storage::StorageError;

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

/// What shards say to each other.
pub enum ShardMessage {
    /// Send this shard's report through the channel (a scrape of the metrics endpoint).
    Scrape(glommio::channels::shared_channel::SharedSender<ShardReport>),
    /// A service request that reached another shard than its copyset's: serve it and send
    /// the answer back through the channel.
    Forward(Forwarded),
}

/// One shard's figures, handed to the shard that serves the metrics endpoint.
pub struct ShardReport {
    /// Its metrics.
    pub metrics: crate::metrics::Snapshot,
    /// Its copysets' raft state.
    pub status: Vec<serde_json::Value>,
    /// Its chunk slots: (all, free).
    pub slots: (u64, u64),
    /// Its connections, for `/status`.
    pub connections: serde_json::Value,
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

mod admin;
mod apply;
mod apply_meta;
mod drive;
mod install;
mod loops;
mod mds;
mod metrics;
mod raft_in;
mod requests;
mod scheduler;
mod scrub;
pub use install::IMAGE_PIECE_BYTES;
pub use scrub::ScrubSettings;

/// How long a stopping shard waits for its connections' sockets to close (a peer that does
/// not read can hold a graceful close this long).
const LINKS_END_WITHIN: Duration = Duration::from_secs(1);

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
    net: RefCell<NetContext>,
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
    /// The pace of the shard's snapshot installs (`placement.recovery_mib_per_s`).
    install_pace: install::Pace,
    /// Seeds the copysets' election randomness.
    seed: u64,
    /// This shard's metrics: plain cells, touched only by this shard.
    metrics: crate::metrics::Registry,
    /// The request path's instruments from `metrics`, kept.
    hot: HotMetrics,
    /// One service request in this many is traced with a `request` span (0: none).
    trace_every: Cell<u64>,
    /// The node's admin token (`[admin] token_file`): what `RESET_PEERS` must carry.
    admin_token: RefCell<Option<Rc<[u8]>>>,
    /// Service requests received, for the trace sampling.
    received: Cell<u64>,
    /// Spans of the traced requests waiting on their copyset, by token.
    traced: RefCell<HashMap<Token, tracing::Span>>,
    /// The channel mesh to the process's other shards (for forwarded requests), once set.
    mesh: RefCell<Option<Rc<crate::shard::Mesh<ShardMessage>>>>,
    /// The placement service's view, used while this shard leads the metadata copyset.
    mds: RefCell<mds::Mds>,
    /// The recovery scheduler, run while this shard leads the metadata copyset.
    scheduler: RefCell<scheduler::Scheduler>,
    /// Replicas joined lately and replicas being removed as stale (`admin`).
    lifecycle: RefCell<admin::Lifecycle>,
    /// The sums scrub entries gave, for the scrubber to collect (`scrub`).
    scrubs: RefCell<scrub::ScrubResults>,
    /// The background scrubber, run while this shard leads the metadata copyset.
    scrubber: RefCell<scrub::Scrubber>,
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
            net: RefCell::new(NetContext::default()),
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
            install_pace: install::Pace::default(),
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
            admin_token: RefCell::new(None),
            received: Cell::new(0),
            traced: RefCell::new(HashMap::new()),
            mds: RefCell::new(mds::Mds::new()),
            scheduler: RefCell::new(scheduler::Scheduler::new()),
            lifecycle: RefCell::new(admin::Lifecycle::default()),
            scrubs: RefCell::new(scrub::ScrubResults::default()),
            scrubber: RefCell::new(scrub::Scrubber::default()),
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

    /// The placement service's timing: the nodes' heartbeat interval and the silence after
    /// which a node is offline.
    pub fn set_placement_timing(&self, heartbeat: Duration, offline_after: Duration) {
        let mut mds = self.mds.borrow_mut();
        mds.heartbeat = heartbeat;
        mds.offline_after = offline_after;
    }

    /// This shard's report for the node's heartbeat and metrics scrapes.
    pub fn report(&self) -> ShardReport {
        let (slots_total, slots_free) = self.engine.slot_counts();
        ShardReport {
            metrics: self.metrics_snapshot(),
            status: self.status_json(),
            slots: (u64::from(slots_total), u64::from(slots_free)),
            connections: self.connections_json(),
        }
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
        let server = Rc::clone(&self);
        tasks.push(glommio::spawn_local(async move { server.schedule_loop().await }).detach());
        let server = Rc::clone(&self);
        tasks.push(glommio::spawn_local(async move { server.scrub_loop().await }).detach());
        let listeners = std::iter::once(("peer", peer_listener))
            .chain(client_listeners.into_iter().map(|l| ("client", l)));
        let mut accepting = Vec::new();
        for (class, listener) in listeners {
            let server = Rc::clone(&self);
            let shutdown = shutdown.clone();
            accepting.push(
                glommio::spawn_local(
                    async move { server.accept_loop(listener, class, shutdown).await },
                )
                .detach(),
            );
        }
        shutdown.raised().await;
        for task in tasks {
            task.cancel();
        }
        // The accept loops close their listeners and whatever connections those set up
        // but never handed over; wait for them, so nothing of this node stays open.
        for task in accepting {
            let _ = task.await;
        }
        // Close every connection, both ways, so peers and clients see this node go — and
        // wait until their sockets are gone: a connection left half-closed and unread when
        // the executor ends would hold a peer's sends for good, as no exiting process would.
        let mut closed: Vec<crate::net::Connection> =
            self.accepted.borrow_mut().drain(..).collect();
        closed.extend(self.peers.borrow().values().filter_map(|peer| peer.close()));
        let ended = crate::net::close_all(&closed, LINKS_END_WITHIN).await;
        if !ended {
            warn!(
                node = self.node,
                shard = self.shard,
                "connections still open at shutdown"
            );
        }
        // Make what was acknowledged durable before the shard goes.
        let wal = self.engine.wal();
        if let Err(error) = wal.sync(wal.appended()).await {
            warn!(node = self.node, shard = self.shard, %error, "final WAL sync failed");
        }
        info!(node = self.node, shard = self.shard, "shard stopped");
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
        let peer = Rc::new(PeerConnection::new(
            endpoint,
            self.net.borrow().clone(),
            backoff,
        ));
        self.peers
            .borrow_mut()
            .insert((node, shard), Rc::clone(&peer));
        Some(peer)
    }

    /// The admin token `RESET_PEERS` must carry (`None`: the operation is refused).
    pub fn set_admin_token(&self, token: Option<&[u8]>) {
        *self.admin_token.borrow_mut() = token.map(Rc::from);
    }

    /// The timeouts and RDMA settings of the shard's connections to other nodes (`[net]`).
    pub fn set_net(&self, net: NetContext) {
        *self.net.borrow_mut() = net;
    }

    /// Traces one service request in `every` with a `request` span (0: none).
    pub fn set_trace_every(&self, every: u64) {
        self.trace_every.set(every);
    }

    /// Hands the shard its ends of the channel mesh, through which requests that reach the
    /// wrong shard go to their copyset's.
    pub fn set_mesh(&self, mesh: Rc<crate::shard::Mesh<ShardMessage>>) {
        *self.mesh.borrow_mut() = Some(mesh);
    }

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
