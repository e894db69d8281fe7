//! The driver's interface: feed inputs in, take a `Ready` out, report back.
//!
//! ```text
//! loop {
//!     inputs:  tick() at a fixed period; step(msg) for each message received;
//!              propose / propose_conf_change / read_index / lease_read / transfer_leader
//!     if has_ready():
//!         let rd = ready()?
//!         1. send rd.messages                          (any time, any order, even now)
//!         2. persist, in this order: rd.snapshot (also install it in the state machine),
//!            rd.entries (an append at index i first drops the stored entries from i),
//!            rd.hard_state — possibly asynchronously, in the order the readies came
//!         3. apply rd.committed_entries in order; for a ConfChange entry call
//!            apply_conf_change; serve rd.read_states once applied reaches their index
//!         4. advance(&rd) when 2 and 3 are done — or, with an asynchronous log,
//!            on_persisted(rd.number) when the write completes and on_applied(index) as the
//!            state machine progresses
//! }
//! ```
//!
//! Messages whose sending promises persisted state (a vote, an append acknowledgement, any
//! message of a non-leader) are held inside until `on_persisted` covers the ready that wrote
//! that state; they come out in a later `Ready`. A leader's appends leave at once: it writes
//! its own log in parallel and counts itself toward commitment only once `on_persisted`
//! reports the entries durable.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::conf_change::ConfChange;
use crate::message::Message;
use crate::raft::{Config, Raft, RaftError, ReadState, StateRole};
use crate::storage::LogStorage;
use crate::types::{ConfState, Entry, HardState, LogIndex, NodeId, Snapshot, Term};

/// Who leads, as this peer sees it; volatile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftState {
    /// The known leader.
    pub leader: Option<NodeId>,
    /// This peer's role.
    pub role: StateRole,
}

/// Everything raft wants done, numbered. See the module documentation for the order.
#[derive(Debug, Default)]
pub struct Ready {
    /// This ready's number, for `on_persisted`.
    pub number: u64,
    /// Changed leader or role, if it changed.
    pub soft_state: Option<SoftState>,
    /// The hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it and install it in the state machine
    /// before the entries.
    pub snapshot: Option<Snapshot>,
    /// Entries to append to the log.
    pub entries: Vec<Entry>,
    /// Messages that may be sent now.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Reads that may be served once the state machine applied their index.
    pub read_states: Vec<ReadState>,
}

/// What one ready asked to persist.
#[derive(Debug)]
struct PersistRecord {
    number: u64,
    last_entry: Option<(LogIndex, Term)>,
    snapshot_index: Option<LogIndex>,
}

/// A raft peer with the ready/advance cycle around it.
#[derive(Debug)]
pub struct RawNode<S: LogStorage> {
    raft: Raft<S>,
    prev_soft: SoftState,
    prev_hard: HardState,
    next_number: u64,
    /// Readies with writes not yet reported persisted, oldest first.
    records: VecDeque<PersistRecord>,
    /// Messages held until the ready numbered with them is persisted.
    held: VecDeque<(u64, Message)>,
    /// Held messages now free to go out with the next ready.
    released: Vec<Message>,
}

impl<S: LogStorage> RawNode<S> {
    /// A peer over `storage`: restarts from whatever storage holds.
    pub fn new(config: Config, storage: S) -> Result<RawNode<S>, RaftError> {
        let raft = Raft::new(config, storage)?;
        let prev_soft = SoftState {
            leader: raft.leader,
            role: raft.state,
        };
        let prev_hard = raft.hard_state();
        Ok(RawNode {
            raft,
            prev_soft,
            prev_hard,
            next_number: 1,
            records: VecDeque::new(),
            held: VecDeque::new(),
            released: Vec::new(),
        })
    }

    /// The protocol state, read-only.
    pub fn raft(&self) -> &Raft<S> {
        &self.raft
    }

    /// The storage, to read.
    pub fn store(&self) -> &S {
        &self.raft.log.storage
    }

    /// The storage, to write what a `Ready` asks.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.raft.log.storage
    }

    /// Gives the storage back (a crash in a simulation keeps only this).
    pub fn into_store(self) -> S {
        self.raft.log.storage
    }

    /// Advances the clock by one tick.
    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// Starts an election now (with a pre-vote round when configured).
    pub fn campaign(&mut self) {
        if self.raft.state != StateRole::Leader {
            self.raft.force_election_timeout();
        }
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, msg: Message) -> Result<(), RaftError> {
        self.raft.step(msg)
    }

    /// Proposes application data; returns the entry's index.
    pub fn propose(&mut self, data: Bytes) -> Result<LogIndex, RaftError> {
        self.raft.propose(data)
    }

    /// Proposes a membership change; returns the entry's index.
    pub fn propose_conf_change(&mut self, change: &ConfChange) -> Result<LogIndex, RaftError> {
        self.raft.propose_conf_change(change)
    }

    /// Applies a committed membership change; call it while applying its entry.
    pub fn apply_conf_change(&mut self, change: &ConfChange) -> Result<ConfState, RaftError> {
        self.raft.apply_conf_change(change)
    }

    /// Asks for a linearizable read confirmed by a quorum (ReadIndex).
    pub fn read_index(&mut self, context: Bytes) -> Result<(), RaftError> {
        self.raft.read_index(context)
    }

    /// A read under the leader lease; `LeaseNotValid` when it cannot be proven.
    pub fn lease_read(&mut self, context: Bytes) -> Result<(), RaftError> {
        self.raft.lease_read(context)
    }

    /// Hands leadership to `to`.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), RaftError> {
        self.raft.transfer_leader(to)
    }

    /// Wakes a quiescent group (the driver suspects a peer failed).
    pub fn wake(&mut self) {
        self.raft.wake();
    }

    /// Storage has fetched entries it answered `TemporarilyUnavailable` for.
    pub fn on_entries_fetched(&mut self) {
        self.raft.on_entries_fetched();
    }

    fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.raft.leader,
            role: self.raft.state,
        }
    }

    /// Whether `ready()` has anything.
    pub fn has_ready(&self) -> bool {
        (self.raft.needs_broadcast && self.raft.state == StateRole::Leader)
            || !self.raft.outbox.is_empty()
            || !self.released.is_empty()
            || self.raft.log.has_unhanded()
            || self.raft.hard_state() != self.prev_hard
            || self.raft.log.has_next_committed()
            || !self.raft.read_states.is_empty()
            || self.soft_state() != self.prev_soft
    }

    /// Takes out everything there is to do.
    pub fn ready(&mut self) -> Result<Ready, RaftError> {
        if self.raft.needs_broadcast && self.raft.state == StateRole::Leader {
            // Every proposal since the last ready goes to each follower in one append.
            self.raft.broadcast_append();
        }
        let number = self.next_number;
        self.next_number += 1;
        let mut ready = Ready {
            number,
            ..Ready::default()
        };

        let soft = self.soft_state();
        if soft != self.prev_soft {
            ready.soft_state = Some(soft);
            self.prev_soft = soft;
        }
        let unpersisted = self.raft.log.take_unhanded();
        let hard = self.raft.hard_state();
        if hard != self.prev_hard {
            ready.hard_state = Some(hard);
            self.prev_hard = hard;
        }
        let writes = unpersisted.snapshot.is_some()
            || !unpersisted.entries.is_empty()
            || ready.hard_state.is_some();
        if writes {
            self.records.push_back(PersistRecord {
                number,
                last_entry: unpersisted.entries.last().map(|e| (e.index, e.term)),
                snapshot_index: unpersisted.snapshot.as_ref().map(|s| s.meta.index),
            });
        }
        ready.snapshot = unpersisted.snapshot;
        ready.entries = unpersisted.entries;

        ready.messages = std::mem::take(&mut self.released);
        let wait_for = self.records.back().map(|r| r.number);
        for outgoing in std::mem::take(&mut self.raft.outbox) {
            match wait_for {
                Some(number) if outgoing.after_persist => {
                    self.held.push_back((number, outgoing.msg))
                }
                _ => ready.messages.push(outgoing.msg),
            }
        }
        ready.committed_entries = self
            .raft
            .log
            .take_next_committed(self.raft_config_committed_limit())?;
        ready.read_states = std::mem::take(&mut self.raft.read_states);
        Ok(ready)
    }

    fn raft_config_committed_limit(&self) -> u64 {
        self.raft.committed_size_limit()
    }

    /// Everything readies up to `number` asked to persist is durable. Readies must be
    /// persisted in order.
    pub fn on_persisted(&mut self, number: u64) {
        while let Some(record) = self.records.front() {
            if record.number > number {
                break;
            }
            let Some(record) = self.records.pop_front() else {
                break;
            };
            if let Some(index) = record.snapshot_index {
                self.raft.log.stable_snapshot_to(index);
            }
            if let Some((index, term)) = record.last_entry {
                self.raft.on_persisted_entries(index, term);
            }
        }
        while let Some((held_for, _)) = self.held.front() {
            if *held_for > number {
                break;
            }
            if let Some((_, msg)) = self.held.pop_front() {
                self.released.push(msg);
            }
        }
    }

    /// The state machine has applied everything up to `index`.
    pub fn on_applied(&mut self, index: LogIndex) {
        self.raft.on_applied(index);
    }

    /// Both reports for a ready handled synchronously: its writes are durable and its
    /// committed entries applied.
    pub fn advance(&mut self, ready: &Ready) {
        self.on_persisted(ready.number);
        if let Some(last) = ready.committed_entries.last() {
            self.on_applied(last.index);
        }
    }
}
