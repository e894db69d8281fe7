//! Raft messages from other nodes, and the WAL admission of client data they carry.

use std::rc::Rc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::{CopysetCell, ShardServer};
use crate::ids::CopysetId;
use crate::protocol::RaftBatch;
use crate::storage::bdev::Bdev;

impl<B: Bdev + 'static> ShardServer<B> {
    pub(super) fn receive_raft(self: &Rc<Self>, payload: &Bytes) {
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
            // Only from a node of the cluster's configuration, and to this one (issue 25,
            // item 8): a frame forged as another node must not reach raft.
            let known = self.cluster.nodes.contains_key(&message.from.0);
            if !known || message.to.0 != self.node {
                self.count_raft_dropped(if known {
                    "addressed to another node"
                } else {
                    "from a node outside the cluster"
                });
                warn!(node = self.node, %copyset, from = message.from.0, to = message.to.0,
                    "raft message from outside the cluster or to another node dropped");
                continue;
            }
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

    /// Counts a raft message or frame dropped for where it came from.
    pub(super) fn count_raft_dropped(&self, reason: &'static str) {
        self.metrics
            .counter(
                "chunkserver_raft_dropped_total",
                "Raft messages dropped for their origin: a client port, a sender outside the cluster, another recipient.",
                &[("reason", reason)],
            )
            .inc();
    }

    /// Whether the WAL admits the client data an append from the leader carries (entries
    /// past this replica's log; a new leader's no-op and membership changes are raft's own
    /// and always pass). A deferred append is dropped before raft sees it, like a lost
    /// message: the leader sends it again, and no persist of this copyset ever waits behind
    /// it, so its votes and acknowledgements keep flowing (docs/architecture.md, "WAL space").
    pub(super) fn admits_append(&self, core: &CopysetCell<B>, message: &raftcore::Message) -> bool {
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
    pub(super) fn admits_proposal(&self, bytes: usize) -> bool {
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
}
