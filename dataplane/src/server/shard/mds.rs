//! The placement service's requests, served by the shard that holds the metadata copyset's
//! replica while that replica leads (anything else answers with a redirect, so the client's
//! leader search finds the service like any copyset's leader).
//!
//! `HEARTBEAT`: a chunkserver reports itself; the first report of a node (or one with new
//! labels) since this instance led registers it in the node table — a raft entry, so the
//! registry outlives the leader — and every report is kept in memory with its arrival time
//! (volatile, like Curve's MDS: a new leader starts with no heartbeats and learns them
//! within one interval); a leader's report of a pool copyset whose voters differ from the
//! pool's record updates the record (`CopysetPeers`), so the pool follows membership changes.
//! `TOPOLOGY`: the registered nodes with their state and last report.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcore::StateRole;

use super::ShardServer;
use crate::copyset::ChunkOp;
use crate::ids::CopysetId;
use crate::placement::meta::MetaOp;
use crate::placement::schedule::{stale_replicas, HeldReplica, LeaderView};
use crate::placement::tables::{
    self, PoolMember, NODE_CHUNK, NODE_RECORD_LEN, POOL_CHUNK, POOL_RECORD_LEN,
};
use crate::protocol::placement::{self as body, Heartbeat, HeartbeatReply, Topology, TopologyNode};
use crate::protocol::{self, Status};
use crate::storage::bdev::Bdev;
use crate::volume_table::METADATA_COPYSET;

/// What this instance of the placement service knows beyond the tables.
pub(super) struct Mds {
    /// The metadata copyset's term this view belongs to; a new term starts a new view.
    term: u64,
    /// When this view started.
    since: Instant,
    /// Each node's last heartbeat and when it arrived.
    pub(super) seen: BTreeMap<u64, (Instant, Heartbeat)>,
    /// Nodes whose registration (as they are) this view saw committed.
    registered: BTreeMap<u64, PoolMember>,
    /// The heartbeat interval nodes use.
    pub(super) heartbeat: Duration,
    /// Silence after which a node is offline.
    pub(super) offline_after: Duration,
    /// Since when each (node, copyset) replica has been seen stale (left behind by a
    /// membership change); removal is asked for once it stayed so for `offline_after`.
    stale_since: BTreeMap<(u64, u64), Instant>,
}

impl Mds {
    pub(super) fn new() -> Mds {
        let placement = crate::config::PlacementSection::default();
        Mds {
            term: 0,
            since: Instant::now(),
            seen: BTreeMap::new(),
            registered: BTreeMap::new(),
            heartbeat: placement.heartbeat(),
            offline_after: placement.offline_after(),
            stale_since: BTreeMap::new(),
        }
    }

    /// Starts a new view when the term moved on (this replica led, lost, and leads again).
    fn enter(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.since = Instant::now();
            self.seen.clear();
            self.registered.clear();
            self.stale_since.clear();
        }
    }

    /// A node's state: by the age of its last heartbeat, or, never heard in this view,
    /// `unknown` until the view is older than the offline bound.
    pub(super) fn state(&self, node: u64, now: Instant) -> (&'static str, Option<u64>) {
        match self.seen.get(&node) {
            Some((at, _)) => {
                let age = now.saturating_duration_since(*at);
                let state = if age <= self.heartbeat * 3 {
                    "up"
                } else if age < self.offline_after {
                    "unstable"
                } else {
                    "offline"
                };
                (state, Some(age.as_millis() as u64))
            }
            None if now.saturating_duration_since(self.since) < self.offline_after => {
                ("unknown", None)
            }
            None => ("offline", None),
        }
    }
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// The metadata copyset's term when this replica leads it; otherwise the answer to give.
    pub(super) fn leading_metadata(&self, copyset: CopysetId) -> Result<u64, (Status, Bytes)> {
        if copyset != METADATA_COPYSET {
            return Err((
                Status::Invalid("the placement service is the metadata copyset's".into()),
                Bytes::new(),
            ));
        }
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Err((Status::CopysetNotFound, Bytes::new()));
        };
        let core = core.borrow();
        if core.role() != StateRole::Leader {
            let leader = core.leader().map_or(0, |l| l.0);
            return Err((Status::Redirect { leader }, Bytes::new()));
        }
        let term = core.node().raft().term.0;
        self.mds.borrow_mut().enter(term);
        Ok(term)
    }

    /// `HEARTBEAT`: registers the node if this view has not seen it registered as it is, then
    /// keeps its report.
    pub(super) async fn heartbeat(
        self: &Rc<Self>,
        copyset: CopysetId,
        payload: &[u8],
    ) -> (Status, Bytes) {
        if let Err(answer) = self.leading_metadata(copyset) {
            return answer;
        }
        let report: Heartbeat = match body::decode(payload) {
            Ok(report) => report,
            Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
        };
        let member = PoolMember {
            node: report.node,
            zone: report.zone.clone(),
            host: report.host.clone(),
        };
        if self.mds.borrow().registered.get(&member.node) != Some(&member) {
            let op = ChunkOp::Meta(MetaOp::NodeRegister(member.clone())).encode();
            let (status, answer) = self
                .propose_chunk_op(protocol::PLACEMENT, copyset, op)
                .await;
            if status != Status::Ok {
                return (status, answer);
            }
            self.mds.borrow_mut().registered.insert(member.node, member);
        }
        let pool = match super::apply_meta::read_dense(&self.engine, POOL_CHUNK, POOL_RECORD_LEN)
            .await
            .map(|table| tables::pool(&table))
        {
            Ok(Ok(pool)) => pool,
            _ => Vec::new(),
        };
        let moved = moved_copysets(&report, &pool);
        let reply = HeartbeatReply {
            stale: self.stale_of(&report, &pool),
        };
        self.mds
            .borrow_mut()
            .seen
            .insert(report.node, (Instant::now(), report));
        for (copyset_moved, peers) in moved {
            let op = MetaOp::CopysetPeers {
                copyset: copyset_moved,
                peers,
            };
            let (status, answer) = self
                .propose_chunk_op(protocol::PLACEMENT, copyset, ChunkOp::Meta(op).encode())
                .await;
            if status != Status::Ok {
                return (status, answer);
            }
        }
        (Status::Ok, body::encode(&reply))
    }

    /// The reporting node's replicas that stayed stale (`schedule::stale_replicas`) for the
    /// grace period: the copysets the node is to remove.
    fn stale_of(&self, report: &Heartbeat, pool: &[tables::PoolCopyset]) -> Vec<u64> {
        let pool: BTreeMap<CopysetId, Vec<u64>> = pool
            .iter()
            .filter(|c| c.state == tables::PoolState::Ready)
            .map(|c| (c.copyset, c.peers.clone()))
            .collect();
        let mut mds = self.mds.borrow_mut();
        let mut leaders: BTreeMap<CopysetId, LeaderView> = BTreeMap::new();
        for (_, other) in mds.seen.values().filter(|(_, r)| r.node != report.node) {
            for replica in other.replicas.iter().filter(|r| r.role == "leader") {
                let newer = leaders
                    .get(&CopysetId(replica.copyset))
                    .map_or(true, |known| replica.term > known.term);
                if newer {
                    let members = replica.voters.iter().chain(&replica.others).copied();
                    leaders.insert(
                        CopysetId(replica.copyset),
                        LeaderView {
                            node: other.node,
                            term: replica.term,
                            members: members.collect(),
                        },
                    );
                }
            }
        }
        let held: Vec<HeldReplica> = report
            .replicas
            .iter()
            .map(|r| HeldReplica {
                copyset: CopysetId(r.copyset),
                leading: r.role == "leader",
                term: r.term,
            })
            .collect();
        let stale = stale_replicas(report.node, &held, &pool, &leaders);
        let now = Instant::now();
        let grace = mds.offline_after;
        let node = report.node;
        mds.stale_since
            .retain(|(n, c), _| *n != node || stale.contains(&CopysetId(*c)));
        stale
            .into_iter()
            .filter(|c| {
                let since = *mds.stale_since.entry((node, c.0)).or_insert(now);
                now.duration_since(since) >= grace
            })
            .map(|c| c.0)
            .collect()
    }

    /// `TOPOLOGY`: every registered node, its state and its last report.
    pub(super) async fn topology(self: &Rc<Self>, copyset: CopysetId) -> (Status, Bytes) {
        if let Err(answer) = self.leading_metadata(copyset) {
            return answer;
        }
        let table =
            match super::apply_meta::read_dense(&self.engine, NODE_CHUNK, NODE_RECORD_LEN).await {
                Ok(table) => table,
                Err(error) => return (super::status_of_storage(&error), Bytes::new()),
            };
        let registered = match tables::nodes(&table) {
            Ok(nodes) => nodes,
            Err(error) => return (Status::Io(error.to_string()), Bytes::new()),
        };
        let mds = self.mds.borrow();
        let now = Instant::now();
        let mut nodes: Vec<TopologyNode> = registered
            .into_iter()
            .map(|member| {
                let (state, age_ms) = mds.state(member.node, now);
                TopologyNode {
                    node: member.node,
                    zone: member.zone,
                    host: member.host,
                    state: state.to_string(),
                    age_ms,
                    last: mds.seen.get(&member.node).map(|(_, r)| r.clone()),
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.node);
        let topology = Topology {
            service: self.node,
            nodes,
        };
        (Status::Ok, body::encode(&topology))
    }
}

/// The pool copysets the reporting node leads whose voters are no longer those the pool
/// records (a membership change moved them), with their voters now: the pool follows the
/// leaders' reports, so clients that look a copyset up find its current nodes.
fn moved_copysets(report: &Heartbeat, pool: &[tables::PoolCopyset]) -> Vec<(CopysetId, Vec<u64>)> {
    let mut moved = Vec::new();
    let leading = report
        .replicas
        .iter()
        .filter(|r| r.role == "leader" && r.copyset >= tables::FIRST_POOL_COPYSET);
    for replica in leading {
        let Some(known) = pool.iter().find(|c| c.copyset.0 == replica.copyset) else {
            continue;
        };
        let mut now = replica.voters.clone();
        let mut recorded = known.peers.clone();
        now.sort_unstable();
        recorded.sort_unstable();
        if !now.is_empty() && now != recorded {
            moved.push((CopysetId(replica.copyset), replica.voters.clone()));
        }
    }
    moved
}
