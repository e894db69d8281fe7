//! A copyset's logic as a pure state machine: it owns one raftcore node and turns raft's
//! `Ready`s into commands for the shell — send these messages, persist these entries, apply
//! this operation, answer this client — and accepts the completions. No I/O, no clock, no
//! async: the shard's tasks around it do the work, and tests drive it by hand.
//!
//! Ordering rules it enforces:
//! - persist completions are reported to raft in ready order, whatever order they finish in;
//! - applies of one chunk run in log order, one at a time; applies of different chunks may
//!   run concurrently and finish in any order;
//! - raft hears `on_applied(i)` only once every entry up to `i` is applied;
//! - a client's proposal is answered when its own entry (same index *and* term) is applied,
//!   and answered `Dropped` when another entry took its index; reads are served once the
//!   applied index reaches their read index.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use raftcore::{
    ConfChange, ConfState, Entry, EntryKind, HardState, LogIndex, LogStorage, Message, NodeId,
    RaftError, RawNode, Snapshot, StateRole, Term,
};

use super::op::ChunkOp;
use crate::ids::{ChunkId, CopysetId};

/// Identifies a waiting client request to the shell.
pub type Token = u64;

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This replica does not lead; the client should go to `leader` (when known).
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<NodeId>,
    },
    /// The entry was replaced by another leader's before it committed: not applied.
    Dropped,
    /// The request is malformed or raft refused it.
    Invalid(String),
    /// Not now: an earlier membership change is still being applied; try again.
    Busy(String),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Send `message` to peer `message.to`.
    Send(Message),
    /// Persist, in this order, then report `on_persisted(number)`: the snapshot (and install
    /// it in the state machine), the entries, the hard state.
    Persist {
        /// The ready's number.
        number: u64,
        /// A snapshot from the leader.
        snapshot: Option<Snapshot>,
        /// Entries to append (an append at index i first drops stored entries from i).
        entries: Vec<Entry>,
        /// The hard state, when it changed.
        hard_state: Option<HardState>,
    },
    /// Apply `op` (log position `index`) to the state machine, then report
    /// `on_applied(index)`. When `token` is set, answer that client with the result.
    Apply {
        /// Log index of the operation.
        index: LogIndex,
        /// The operation.
        op: ChunkOp,
        /// The client waiting for it, if this replica proposed it.
        token: Option<Token>,
    },
    /// Answer a client without applying anything.
    Refuse {
        /// The client.
        token: Token,
        /// Why.
        refusal: Refusal,
    },
    /// Serve the read `token` now: everything committed before it was issued is applied.
    Read {
        /// The client.
        token: Token,
    },
    /// The membership change at `index` is applied and everything before it too: record
    /// `conf_state` with the applied index `index` (raft's restart reads the membership as of
    /// the applied index). `tokens` are the clients whose change this completes: their own
    /// entry, or, for a change that entered a joint configuration, the entry that left it.
    ConfChanged {
        /// Log index of the change.
        index: LogIndex,
        /// The membership after it.
        conf_state: ConfState,
        /// Clients to answer (with `conf_state`).
        tokens: Vec<Token>,
    },
    /// Leadership or role changed (for the status page and client redirects).
    RoleChanged {
        /// The new role.
        role: StateRole,
        /// The known leader.
        leader: Option<NodeId>,
    },
}

/// A copyset's state on top of its raft node.
pub struct CopysetCore<S: LogStorage> {
    id: CopysetId,
    node: RawNode<S>,
    role: StateRole,
    leader: Option<NodeId>,
    /// Proposals awaiting their entry: index → (term proposed in, client).
    /// Invariant: every key is above `applied`.
    proposals: BTreeMap<LogIndex, (Term, Token)>,
    /// Per chunk, the applies handed out (front) and those queued behind it, in log order.
    /// Invariant: no empty queue is kept.
    chunk_queues: HashMap<ChunkId, VecDeque<(LogIndex, ChunkOp, Option<Token>)>>,
    /// Operations delivered behind a barrier ([`ChunkOp::is_barrier`]), in log order; the
    /// front is a barrier waiting for `chunk_queues` to drain, or (while `barrier` runs) the
    /// first operation after it. Invariant: empty unless a barrier waits or runs.
    held: VecDeque<(LogIndex, ChunkOp, Option<Token>)>,
    /// The barrier being applied, alone.
    barrier: Option<LogIndex>,
    /// Indices above `applied` whose apply is done.
    completed: BTreeSet<LogIndex>,
    /// Every entry up to here is applied. Invariant: applied <= delivered.
    applied: LogIndex,
    /// The last committed entry handed to the apply machinery.
    delivered: LogIndex,
    /// Persist commands in flight, in ready order, with whether each is done.
    persists: VecDeque<(u64, bool)>,
    /// Reads waiting for `applied` to reach their index.
    reads: Vec<(LogIndex, Token)>,
    /// Membership changes applied to raft whose `ConfChanged` waits for `applied` to reach
    /// their index, in log order, each with the client waiting for it.
    conf_changes: VecDeque<(LogIndex, ConfState, Option<Token>)>,
    /// Clients whose change entered a joint configuration: answered when it is left.
    joint_waiters: Vec<Token>,
    actions: VecDeque<Action>,
}

impl<S: LogStorage> CopysetCore<S> {
    /// Wraps a raft node. `applied` must be what the node was configured with; the state
    /// machine must hold at least the storage's snapshot (a bootstrap snapshot of a new group
    /// is empty), so `applied` starts no lower than the snapshot's index.
    pub fn new(id: CopysetId, node: RawNode<S>, applied: LogIndex) -> CopysetCore<S> {
        let snapshot_index = node
            .store()
            .snapshot_meta()
            .map(|meta| meta.index)
            .unwrap_or_default();
        let applied = applied.max(snapshot_index);
        let role = node.raft().state;
        let leader = node.raft().leader;
        CopysetCore {
            id,
            node,
            role,
            leader,
            proposals: BTreeMap::new(),
            chunk_queues: HashMap::new(),
            held: VecDeque::new(),
            barrier: None,
            completed: BTreeSet::new(),
            applied,
            delivered: applied,
            persists: VecDeque::new(),
            reads: Vec::new(),
            conf_changes: VecDeque::new(),
            joint_waiters: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// The copyset.
    pub fn id(&self) -> CopysetId {
        self.id
    }

    /// This replica's role.
    pub fn role(&self) -> StateRole {
        self.role
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Everything up to this index is applied.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Persist commands handed out and not yet reported done (done ones waiting for an
    /// earlier one count too).
    pub fn persists_in_flight(&self) -> usize {
        self.persists.len()
    }

    /// The raft node, for status.
    pub fn node(&self) -> &RawNode<S> {
        &self.node
    }

    /// The raft node, for the shell's storage writes (e.g. a `MemStorage` in tests).
    pub fn node_mut(&mut self) -> &mut RawNode<S> {
        &mut self.node
    }

    /// The next command, if any.
    pub fn next_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.drive();
        }
        self.actions.pop_front()
    }

    /// Whether the group is quiescent (idle: no heartbeats, nothing to tick for).
    pub fn is_quiescent(&self) -> bool {
        self.node.raft().is_quiescent()
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// A raft message from a peer.
    pub fn step(&mut self, message: Message) -> Result<(), RaftError> {
        self.node.step(message)
    }

    /// A client's state-changing request: `encoded` is a [`ChunkOp`] encoding.
    pub fn propose(&mut self, encoded: Bytes, token: Token) {
        if self.role != StateRole::Leader {
            // A client came to this replica: maybe its leader is gone. A quiescent follower
            // does not time out by itself, so restart its election timer.
            self.node.wake();
            self.refuse(
                token,
                Refusal::NotLeader {
                    leader: self.leader,
                },
            );
            return;
        }
        if let Err(error) = ChunkOp::decode(&encoded) {
            self.refuse(token, Refusal::Invalid(error.to_string()));
            return;
        }
        let term = self.node.raft().term;
        match self.node.propose(encoded) {
            Ok(index) => {
                self.proposals.insert(index, (term, token));
            }
            Err(error) => self.refuse(token, refusal_of(error, self.leader)),
        }
    }

    /// A membership change, proposed by the admin. `token` is answered by a `ConfChanged`
    /// once the change is applied (for a joint change, once the joint configuration is
    /// left), or by a `Refuse`.
    pub fn propose_conf_change(&mut self, change: &ConfChange, token: Token) {
        if self.role != StateRole::Leader {
            self.refuse(
                token,
                Refusal::NotLeader {
                    leader: self.leader,
                },
            );
            return;
        }
        let term = self.node.raft().term;
        match self.node.propose_conf_change(change) {
            Ok(index) => {
                self.proposals.insert(index, (term, token));
            }
            Err(error) => self.refuse(token, refusal_of(error, self.leader)),
        }
    }

    /// The membership raft uses now (changes take effect when applied).
    pub fn conf_state(&self) -> &ConfState {
        self.node.raft().conf_state()
    }

    /// Asks leadership to move to `to`.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), RaftError> {
        self.node.transfer_leader(to)
    }

    /// A linearizable read: served through the lease when it holds, else by ReadIndex.
    pub fn read(&mut self, token: Token) {
        if self.role != StateRole::Leader {
            // A client came to this replica: maybe its leader is gone. A quiescent follower
            // does not time out by itself, so restart its election timer.
            self.node.wake();
            self.refuse(
                token,
                Refusal::NotLeader {
                    leader: self.leader,
                },
            );
            return;
        }
        let context = Bytes::copy_from_slice(&token.to_le_bytes());
        let result = match self.node.lease_read(context.clone()) {
            Ok(()) => Ok(()),
            Err(RaftError::LeaseNotValid) => self.node.read_index(context),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            self.refuse(token, refusal_of(error, self.leader));
        }
    }

    /// The persist command of ready `number` is done.
    pub fn on_persisted(&mut self, number: u64) {
        if let Some(entry) = self.persists.iter_mut().find(|(n, _)| *n == number) {
            entry.1 = true;
        }
        let mut last_done = None;
        while let Some(&(n, true)) = self.persists.front() {
            last_done = Some(n);
            self.persists.pop_front();
        }
        if let Some(n) = last_done {
            self.node.on_persisted(n);
        }
    }

    /// The apply of `index` is done (its chunk's next queued apply may start).
    pub fn on_applied(&mut self, index: LogIndex, chunk: ChunkId) {
        if self.barrier == Some(index) {
            self.barrier = None;
            self.release_held();
            self.complete(index);
            return;
        }
        if let Some(queue) = self.chunk_queues.get_mut(&chunk) {
            if queue.front().is_some_and(|(i, _, _)| *i == index) {
                queue.pop_front();
            }
            if let Some((next_index, op, token)) = queue.front() {
                let action = Action::Apply {
                    index: *next_index,
                    op: op.clone(),
                    token: *token,
                };
                self.actions.push_back(action);
            } else {
                self.chunk_queues.remove(&chunk);
                // A held barrier may start now that this chunk's queue drained.
                self.release_held();
            }
        }
        self.complete(index);
    }

    /// Whether applies were handed out and are not done yet (a snapshot install waits for
    /// them: an apply finishing after the image was copied would overwrite it).
    pub fn applies_in_flight(&self) -> bool {
        !self.chunk_queues.is_empty() || self.barrier.is_some() || !self.held.is_empty()
    }

    /// Hands out an operation for applying: behind its chunk's earlier ones, or held when a
    /// barrier waits or runs, and a barrier only once nothing else is in flight.
    fn schedule(&mut self, index: LogIndex, op: ChunkOp, token: Option<Token>) {
        if op.is_barrier() || self.barrier.is_some() || !self.held.is_empty() {
            self.held.push_back((index, op, token));
            self.release_held();
            return;
        }
        self.enqueue(index, op, token);
    }

    /// Queues an operation behind its chunk's earlier ones; it is handed out at once when it
    /// is the only one.
    fn enqueue(&mut self, index: LogIndex, op: ChunkOp, token: Option<Token>) {
        let queue = self.chunk_queues.entry(op.chunk()).or_default();
        if queue.is_empty() {
            self.actions.push_back(Action::Apply {
                index,
                op: op.clone(),
                token,
            });
        }
        queue.push_back((index, op, token));
    }

    /// Starts what the held operations allow: a barrier once every chunk queue drained, the
    /// operations after it once it is done (up to the next barrier).
    fn release_held(&mut self) {
        while self.barrier.is_none() {
            let Some((index, op, token)) = self.held.pop_front() else {
                return;
            };
            if op.is_barrier() {
                if !self.chunk_queues.is_empty() {
                    self.held.push_front((index, op, token));
                    return;
                }
                self.barrier = Some(index);
                self.actions.push_back(Action::Apply { index, op, token });
                return;
            }
            self.enqueue(index, op, token);
        }
    }

    /// The snapshot of an earlier `Persist` is installed in the state machine: everything up
    /// to its index counts as applied.
    pub fn on_snapshot_installed(&mut self, index: LogIndex) {
        if index > self.applied {
            self.applied = index;
            self.delivered = self.delivered.max(index);
            self.completed = self.completed.split_off(&index.next());
            self.node.on_applied(index);
            self.settle();
        }
    }

    fn refuse(&mut self, token: Token, refusal: Refusal) {
        self.actions.push_back(Action::Refuse { token, refusal });
    }

    fn complete(&mut self, index: LogIndex) {
        if index > self.applied {
            self.completed.insert(index);
        }
        let before = self.applied;
        while self.completed.first() == Some(&self.applied.next()) {
            self.completed.pop_first();
            self.applied = self.applied.next();
        }
        if self.applied > before {
            self.node.on_applied(self.applied);
            self.settle();
        }
    }

    /// Serves reads whose index is applied, and drops proposals at or below `applied` that
    /// were never delivered with their own term (already refused when delivered).
    fn settle(&mut self) {
        let applied = self.applied;
        while self
            .conf_changes
            .front()
            .is_some_and(|(i, _, _)| *i <= applied)
        {
            let Some((index, conf_state, token)) = self.conf_changes.pop_front() else {
                break;
            };
            let mut tokens = Vec::new();
            if conf_state.voters_outgoing.is_empty() {
                tokens.append(&mut self.joint_waiters);
                tokens.extend(token);
            } else {
                self.joint_waiters.extend(token);
            }
            self.actions.push_back(Action::ConfChanged {
                index,
                conf_state,
                tokens,
            });
        }
        let mut i = 0;
        while i < self.reads.len() {
            if self.reads[i].0 <= applied {
                let (_, token) = self.reads.swap_remove(i);
                self.actions.push_back(Action::Read { token });
            } else {
                i += 1;
            }
        }
    }

    /// Turns every pending `Ready` into actions.
    fn drive(&mut self) {
        while self.node.has_ready() {
            let ready = match self.node.ready() {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::error!(copyset = %self.id, %error, "raft ready failed");
                    return;
                }
            };
            if let Some(soft) = ready.soft_state {
                let lost_leadership =
                    self.role == StateRole::Leader && soft.role != StateRole::Leader;
                self.role = soft.role;
                self.leader = soft.leader;
                self.actions.push_back(Action::RoleChanged {
                    role: soft.role,
                    leader: soft.leader,
                });
                if lost_leadership {
                    // Reads waiting on a read index this replica can no longer confirm.
                    for (_, token) in std::mem::take(&mut self.reads) {
                        let refusal = Refusal::NotLeader {
                            leader: soft.leader,
                        };
                        self.actions.push_back(Action::Refuse { token, refusal });
                    }
                }
            }
            for message in ready.messages {
                self.actions.push_back(Action::Send(message));
            }
            let persists =
                ready.snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some();
            self.persists.push_back((ready.number, !persists));
            if persists {
                self.actions.push_back(Action::Persist {
                    number: ready.number,
                    snapshot: ready.snapshot,
                    entries: ready.entries,
                    hard_state: ready.hard_state,
                });
            } else {
                // Nothing to write, but earlier writes may still be in flight.
                self.on_persisted(ready.number);
            }
            for entry in ready.committed_entries {
                self.deliver(entry);
            }
            for read in ready.read_states {
                let mut word = [0u8; 8];
                if read.context.len() == 8 {
                    word.copy_from_slice(&read.context);
                }
                self.reads.push((read.index, u64::from_le_bytes(word)));
            }
            self.settle();
        }
    }

    /// A committed entry: hand it to the apply machinery.
    fn deliver(&mut self, entry: Entry) {
        if entry.index <= self.delivered {
            return; // already delivered (e.g. below a snapshot just installed)
        }
        self.delivered = entry.index;
        // The client waiting at this index is answered only if this is its own entry.
        let token = match self.proposals.remove(&entry.index) {
            Some((term, token)) if term == entry.term => Some(token),
            Some((_, token)) => {
                self.refuse(token, Refusal::Dropped);
                None
            }
            None => None,
        };
        // Proposals below this index whose entries never arrived were overwritten.
        let stale: Vec<LogIndex> = self
            .proposals
            .range(..entry.index)
            .map(|(i, _)| *i)
            .collect();
        for index in stale {
            if let Some((_, token)) = self.proposals.remove(&index) {
                self.refuse(token, Refusal::Dropped);
            }
        }
        match entry.kind {
            EntryKind::ConfChange => {
                let applied = match ConfChange::decode(entry.data.clone()) {
                    Ok(change) => self.node.apply_conf_change(&change).map_err(|error| {
                        tracing::error!(copyset = %self.id, index = %entry.index, %error,
                            "conf change refused");
                        error.to_string()
                    }),
                    Err(error) => {
                        tracing::error!(copyset = %self.id, %error, "undecodable conf change");
                        Err(error.to_string())
                    }
                };
                match applied {
                    Ok(conf_state) => {
                        self.conf_changes
                            .push_back((entry.index, conf_state, token));
                    }
                    Err(reason) => {
                        if let Some(token) = token {
                            self.refuse(token, Refusal::Invalid(reason));
                        }
                    }
                }
                self.complete(entry.index);
                // `complete` settles only when `applied` moves; the change may be due now.
                self.settle();
            }
            EntryKind::Normal if entry.data.is_empty() => self.complete(entry.index),
            EntryKind::Normal => match ChunkOp::decode(&entry.data) {
                Ok(op) => self.schedule(entry.index, op, token),
                Err(error) => {
                    // Proposals are checked before they enter the log, so this entry came
                    // from a corrupt log or a newer version: skip it, loudly.
                    tracing::error!(copyset = %self.id, index = %entry.index, %error,
                        "committed entry is not an operation; skipped");
                    if let Some(token) = token {
                        let refusal = Refusal::Invalid(error.to_string());
                        self.actions.push_back(Action::Refuse { token, refusal });
                    }
                    self.complete(entry.index);
                }
            },
        }
    }
}

fn refusal_of(error: RaftError, leader: Option<NodeId>) -> Refusal {
    match error {
        RaftError::NotLeader { .. } => Refusal::NotLeader { leader },
        // Passing states: the client tries again (a transfer ends within an election
        // timeout, with a new leader or the old one).
        RaftError::ConfChangePending
        | RaftError::UncommittedLimit
        | RaftError::TransferInProgress => Refusal::Busy(error.to_string()),
        other => Refusal::Invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_raft_states_are_retried_not_refused() {
        // A leader transfer under way (the balancer moving a leadership during client
        // writes) once answered Invalid, which the client returns as an I/O error.
        for error in [
            RaftError::TransferInProgress,
            RaftError::ConfChangePending,
            RaftError::UncommittedLimit,
        ] {
            assert!(
                matches!(refusal_of(error.clone(), None), Refusal::Busy(_)),
                "{error}"
            );
        }
        assert!(matches!(
            refusal_of(RaftError::NotLeader { leader: None }, Some(NodeId(2))),
            Refusal::NotLeader {
                leader: Some(NodeId(2))
            }
        ));
    }
}
