//! The shard's metrics and its `/status` view.

use std::collections::HashMap;
use std::time::Duration;

use raftcore::StateRole;

use super::{CopysetCell, ShardServer};
use crate::copyset::CopysetCore;
use crate::ids::CopysetId;
use crate::protocol::{self, Status};
use crate::storage::bdev::Bdev;
use crate::storage::engine::CopysetStorage;
use crate::storage::wal::WalStats;

impl<B: Bdev + 'static> ShardServer<B> {
    /// Counts one frame of `bytes` payload bytes on a connection of `class`, `direction` in
    /// or out.
    pub(super) fn count_frame(&self, class: &'static str, direction: &'static str, bytes: usize) {
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

    pub(super) fn count_request(
        &self,
        opcode: crate::net::Opcode,
        status: &Status,
        bytes: u64,
        latency: Duration,
    ) {
        let op = protocol::opcode_name(opcode);
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
        self.gauge_copyset_counts(&copysets);
        let wal = self.engine.wal().stats();
        self.gauge_wal_counts(&wal);
        self.gauge_executor();
        self.gauge_peer_connects();
        for (id, core) in copysets.iter() {
            self.gauge_copyset(*id, core);
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

    /// Sets the gauges of the shard's copysets: how many there are, how many it leads.
    fn gauge_copyset_counts(&self, copysets: &HashMap<CopysetId, CopysetCell<B>>) {
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
    }

    /// Sets the gauges of the WAL's batches and records.
    fn gauge_wal_counts(&self, wal: &WalStats) {
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
    }

    /// Sets the gauges of the shard's executor and of its DMA buffer pool.
    fn gauge_executor(&self) {
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
    }

    /// Sets the gauges of the connections this shard dialled to other nodes' shards.
    fn gauge_peer_connects(&self) {
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
    }

    /// Sets the gauges of one copyset's replica: its role, term, commit and applied indexes,
    /// and its followers' lag.
    fn gauge_copyset(&self, id: CopysetId, core: &CopysetCell<B>) {
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
        let lag = Self::follower_lag(&core);
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

    /// On a leader, the entries the furthest follower (or learner) is behind its log; 0 on
    /// any other replica.
    fn follower_lag(core: &CopysetCore<CopysetStorage<B>>) -> u64 {
        if core.role() != StateRole::Leader {
            return 0;
        }
        let raft = core.node().raft();
        let last = raft.log.last_index();
        core.conf_state()
            .voters
            .iter()
            .chain(&core.conf_state().learners)
            .filter_map(|n| raft.progress(*n))
            .map(|p| last.0.saturating_sub(p.matched.0))
            .max()
            .unwrap_or(0)
    }

    /// The raft view behind a copyset's status: what its log holds and has persisted, the
    /// persists under way, and (on a leader) where each follower stands — what an operator
    /// looks at when a follower does not catch up.
    fn raft_json(&self, id: CopysetId, core: &CopysetCore<CopysetStorage<B>>) -> serde_json::Value {
        let raft = core.node().raft();
        let followers: Vec<serde_json::Value> = core
            .conf_state()
            .voters
            .iter()
            .chain(core.conf_state().learners.iter())
            .filter(|node| node.0 != self.node)
            .filter_map(|node| Some((node.0, raft.progress(*node)?)))
            .map(|(node, p)| {
                serde_json::json!({
                    "node": node,
                    "state": format!("{:?}", p.state).to_lowercase(),
                    "matched": p.matched.0,
                    "next": p.next.0,
                    "paused": p.is_paused(),
                    "inflight": p.inflights.count(),
                    "commit_acked": p.commit_acked.0,
                    "recent_active": p.recent_active,
                })
            })
            .collect();
        serde_json::json!({
            "last_index": raft.log.last_index().0,
            "persisted": raft.log.persisted.0,
            "persists_in_flight": core.persists_in_flight(),
            "backlog": self.backlog.borrow().get(&id).map_or(0, |b| b.len()),
            "quiescent": raft.is_quiescent(),
            "followers": followers,
        })
    }

    /// The shard's connections, for `/status`: those it dialled to other nodes' shards (live
    /// or not, with their dial counts) and those it accepted and still serves.
    pub fn connections_json(&self) -> serde_json::Value {
        let mut dialled: Vec<serde_json::Value> = self
            .peers
            .borrow()
            .iter()
            .map(|((node, shard), peer)| {
                let (made, failed) = peer.dials();
                serde_json::json!({
                    "node": node,
                    "shard": shard,
                    "live": peer.live_label(),
                    "dials": made,
                    "dials_failed": failed,
                })
            })
            .collect();
        dialled.sort_by_key(|d| (d["node"].as_u64(), d["shard"].as_u64()));
        let accepted: Vec<String> = self
            .accepted
            .borrow()
            .iter()
            .filter(|c| !c.is_closed())
            .map(|c| c.label().to_string())
            .collect();
        serde_json::json!({"shard": self.shard, "dialled": dialled, "accepted": accepted})
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
                    "installing": self.installing.borrow().contains(id),
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
                    "raft": self.raft_json(*id, &core),
                }))
            })
            .collect()
    }
}
