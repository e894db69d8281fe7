//! Copyset administration: create, delete and reset a copyset's peers.

use std::time::Duration;

use bytes::Bytes;
use raftcore::{ConfState, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Term};
use tracing::{error, info, warn};

use super::{status_of_storage, CopysetCell, ShardServer};
use crate::copyset::Token;
use crate::ids::CopysetId;
use crate::protocol::Status;
use crate::storage::bdev::Bdev;
use crate::storage::StorageError;

/// How long a replica that a membership change joined is kept from removal as stale: the
/// placement service's view of the copyset (a leader's heartbeat) may predate the change.
const JOINED_GRACE: Duration = Duration::from_secs(600);

/// Replicas this shard joined lately, and replicas it is removing as stale: a join and a stale
/// removal of one copyset exclude each other (issue 19).
#[derive(Default)]
pub(super) struct Lifecycle {
    /// When a membership change last asked for each copyset's joining replica here.
    joined: std::collections::HashMap<CopysetId, std::time::Instant>,
    /// Copysets whose stale replica is being removed.
    removing: std::collections::HashSet<CopysetId>,
}

impl Lifecycle {
    /// Whether a membership change joined this shard's replica of `copyset` lately (within
    /// [`JOINED_GRACE`]): a replica the scheduler added, whose copy is paced.
    pub(super) fn joined_lately(&self, copyset: CopysetId) -> bool {
        self.joined
            .get(&copyset)
            .is_some_and(|at| at.elapsed() < JOINED_GRACE)
    }
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Creates a copyset with `peers` as its first voters: a bootstrap snapshot (index 1,
    /// term 1) and hard state in the WAL, made durable before the copyset starts. With
    /// `join`, this node need not be among `peers` (the copyset's original voters): the replica
    /// starts from the same bootstrap as theirs, takes the leader's log from index 2 once a
    /// peer change adds it, and cannot campaign until it applies its own addition.
    pub(super) async fn create_copyset(
        &self,
        copyset: CopysetId,
        peers: &[NodeId],
        join: bool,
    ) -> Status {
        if copyset.0 == 0 {
            return Status::Invalid("copyset id 0 is reserved".into());
        }
        if !join && !peers.contains(&NodeId(self.node)) {
            return Status::Invalid(format!(
                "the peers do not include this node ({})",
                self.node
            ));
        }
        if join {
            let mut lifecycle = self.lifecycle.borrow_mut();
            if lifecycle.removing.contains(&copyset) {
                return Status::Retry(
                    "this node's stale replica of the copyset is being removed".into(),
                );
            }
            lifecycle.joined.insert(copyset, std::time::Instant::now());
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
    pub(super) async fn open_created(
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
    pub(super) async fn quiet(
        &self,
        copyset: CopysetId,
        core: &CopysetCell<B>,
    ) -> Result<(), Status> {
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

    /// Removes this node's replica of `copyset` as stale, as the placement service asks when
    /// a membership change left it behind: refused while the replica leads, or when a
    /// membership change joined it within [`JOINED_GRACE`] (the service's view may predate
    /// the change); a join asked for while the removal runs is told to retry.
    pub(super) async fn remove_stale_copyset(&self, copyset: CopysetId) -> Status {
        let Some(core) = self.copysets.borrow().get(&copyset).cloned() else {
            return Status::CopysetNotFound;
        };
        if core.borrow().role() == raftcore::StateRole::Leader {
            return Status::Invalid("the replica leads its copyset; it is not stale".into());
        }
        {
            let mut lifecycle = self.lifecycle.borrow_mut();
            let now = std::time::Instant::now();
            lifecycle
                .joined
                .retain(|_, at| now.duration_since(*at) < JOINED_GRACE);
            if lifecycle.joined.contains_key(&copyset) {
                return Status::Invalid(
                    "a membership change joined this replica lately; it is kept".into(),
                );
            }
            if !lifecycle.removing.insert(copyset) {
                return Status::Retry("the stale replica is being removed".into());
            }
        }
        warn!(node = self.node, shard = self.shard, %copyset,
            "removing a stale replica: the copyset's membership left this node behind");
        let status = self.delete_copyset(copyset).await;
        self.lifecycle.borrow_mut().removing.remove(&copyset);
        status
    }

    /// Deletes this node's replica of `copyset` (CopysetService delete): raft stops, a WAL
    /// record makes the deletion durable, then the chunks go.
    pub(super) async fn delete_copyset(&self, copyset: CopysetId) -> Status {
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
                // Its per-copyset series go with it: /metrics stops reporting the copyset.
                self.metrics.forget("copyset", &copyset.0.to_string());
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

    /// `RESET_PEERS` as the admin role allows it: only with the caller's confirmation that
    /// writes may be lost and this node's admin token (compared in constant time); every
    /// refusal is logged, as is every reset carried out.
    pub(super) async fn reset_peers_as_admin(
        &self,
        copyset: CopysetId,
        request: &crate::protocol::ResetPeers,
    ) -> Status {
        let refuse = |why: &str| {
            warn!(
                node = self.node,
                %copyset,
                "RESET_PEERS refused: {why}"
            );
            Status::Invalid(format!("RESET_PEERS refused: {why}"))
        };
        if !request.confirm {
            return refuse(
                "it forces a membership without consensus and can lose acknowledged writes; \
                 it needs the caller's confirmation (chunkctl: --confirm-data-loss)",
            );
        }
        let token = self.admin_token.borrow().clone();
        let Some(token) = token else {
            return refuse("this node has no admin token ([admin] token_file)");
        };
        if !same_secret(&token, &request.token) {
            return refuse("the admin token does not match this node's");
        }
        warn!(
            node = self.node,
            %copyset,
            peers = ?request.peers,
            "RESET_PEERS: forcing the membership without consensus, as the admin asked"
        );
        self.reset_peers(copyset, &request.peers).await
    }

    /// Forces this replica's membership to `peers` (CliService reset peers), for a copyset
    /// whose quorum is gone for good: the membership is recorded with the applied index and
    /// checkpointed, and raft restarts on it. Entries above the applied index that the log
    /// still holds are applied again, membership changes among them.
    pub(super) async fn reset_peers(&self, copyset: CopysetId, peers: &[NodeId]) -> Status {
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
}

/// Whether two secrets are equal, in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}
