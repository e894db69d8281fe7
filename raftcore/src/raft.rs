//! The raft protocol itself: roles, terms, votes, replication, commitment, reads, snapshots,
//! membership and leader transfer. `RawNode` wraps it with the ready/advance cycle; tests may
//! drive `Raft` directly.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::conf_change::{ConfChange, ConfChangeError};
use crate::log::RaftLog;
use crate::message::{Message, MessageType, SnapshotChunk};
use crate::progress::{Progress, ProgressState};
use crate::quorum::{self, VoteResult};
use crate::storage::{LogStorage, StorageError};
use crate::types::{ConfState, Entry, EntryKind, HardState, LogIndex, NodeId, Snapshot, Term};

/// A rule broken on purpose, for tests that prove the simulator catches it. Never set in
/// production; the field that holds it is hidden from the documentation.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// A candidate counts every granted vote response it receives, duplicates included.
    CountDuplicateVotes,
    /// A voter grants its vote without checking that the candidate's log is up to date.
    SkipLogUpToDateCheck,
    /// Votes and append acknowledgements leave before the state they promise is persisted.
    AcknowledgeBeforePersisting,
}

/// How a peer behaves. Times are in ticks: the driver calls `tick()` at a fixed period.
#[derive(Debug, Clone)]
pub struct Config {
    /// This peer's id; never 0.
    pub id: NodeId,
    /// Minimum election timeout; a follower's actual timeout is drawn from
    /// `[election_tick, 2 * election_tick)`.
    pub election_tick: u32,
    /// Ticks between the leader's heartbeats. Must be below `election_tick`.
    pub heartbeat_tick: u32,
    /// Run a pre-vote round before an election (thesis §9.6), so that a partitioned peer that
    /// comes back does not force a new term.
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum within an election timeout,
    /// and followers that heard from a leader ignore vote requests (thesis §6.2, §9.6). Needed
    /// for lease reads.
    pub check_quorum: bool,
    /// Maximum payload of one append message, in bytes (at least one entry is always sent).
    pub max_size_per_msg: u64,
    /// Maximum appends in flight to one follower (the pipelining window).
    pub max_inflight_msgs: usize,
    /// Maximum payload bytes in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Maximum payload of committed entries handed out by one `Ready`.
    pub max_committed_size_per_ready: u64,
    /// Maximum payload of proposed but uncommitted entries; past it proposals are refused.
    pub max_uncommitted_bytes: u64,
    /// Size of one InstallSnapshot piece, in bytes.
    pub snapshot_piece_bytes: u64,
    /// Ticks without a confirmed snapshot piece after which the leader resends from the last
    /// confirmed offset.
    pub snapshot_retry_ticks: u32,
    /// Clock drift allowed between peers over one election timeout, in ticks; the lease is
    /// shortened by it.
    pub lease_drift_ticks: u32,
    /// Idle ticks after which a leader with nothing to do stops heartbeating; 0 never.
    pub quiesce_after_ticks: u32,
    /// Maximum read-index requests waiting for confirmation.
    pub max_pending_reads: usize,
    /// Seed of the random source for election timeouts. Different peers need different seeds.
    pub rng_seed: u64,
    /// The state machine's applied index at start-up (what it recovered); 0 means the
    /// snapshot's index.
    pub applied: LogIndex,
    #[doc(hidden)]
    pub fault: Option<InjectedBug>,
}

impl Config {
    /// A configuration with sensible defaults for peer `id`.
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            max_inflight_bytes: 32 << 20,
            max_committed_size_per_ready: 16 << 20,
            max_uncommitted_bytes: 256 << 20,
            snapshot_piece_bytes: 1 << 20,
            snapshot_retry_ticks: 10,
            lease_drift_ticks: 2,
            quiesce_after_ticks: 0,
            max_pending_reads: 4096,
            rng_seed: id.0,
            applied: LogIndex(0),
            fault: None,
        }
    }

    /// Checks the relations between the settings.
    pub fn validate(&self) -> Result<(), RaftError> {
        let fail = |why: &str| Err(RaftError::InvalidConfig(why.to_string()));
        if self.id.0 == 0 {
            return fail("id must not be 0");
        }
        if self.heartbeat_tick == 0 || self.election_tick <= self.heartbeat_tick {
            return fail("need 0 < heartbeat_tick < election_tick");
        }
        if self.max_inflight_msgs == 0 || self.max_inflight_bytes == 0 {
            return fail("the in-flight window must allow at least one append");
        }
        if self.snapshot_piece_bytes == 0 || self.snapshot_retry_ticks == 0 {
            return fail("snapshot_piece_bytes and snapshot_retry_ticks must be positive");
        }
        if self.lease_drift_ticks + 1 >= self.election_tick {
            return fail("lease_drift_ticks must leave a lease shorter than election_tick");
        }
        Ok(())
    }
}

/// Why raft refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// Only the leader does this; `leader` is the leader this peer knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader, if any.
        leader: Option<NodeId>,
    },
    /// A leader transfer is under way; proposals wait for it to finish.
    #[error("leader transfer in progress")]
    TransferInProgress,
    /// A configuration change is not applied yet; only one may be pending.
    #[error("a configuration change is still pending")]
    ConfChangePending,
    /// The configuration change is not valid here.
    #[error("invalid configuration change: {0}")]
    ConfChange(#[from] ConfChangeError),
    /// Too much is proposed and not committed; retry after commits.
    #[error("too many uncommitted bytes")]
    UncommittedLimit,
    /// Too many read-index requests wait for confirmation.
    #[error("too many pending reads")]
    TooManyPendingReads,
    /// The leader cannot prove its lease now; use `read_index` instead.
    #[error("leader lease not valid")]
    LeaseNotValid,
    /// The transfer target is not a voter of the group.
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
    /// The message was for another peer.
    #[error("message for {to} delivered to {me}")]
    WrongRecipient {
        /// Its recipient.
        to: NodeId,
        /// This peer.
        me: NodeId,
    },
    /// Storage failed; this group cannot go on.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The configuration is not valid.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
}

/// A peer's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateRole {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether it could win an election, without changing terms.
    PreCandidate,
    /// Campaigning in its current term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// A linearizable read the application may now serve: once its state machine has applied
/// `index`, reading it reflects every write acknowledged before the read was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    /// The commit index the read must wait for.
    pub index: LogIndex,
    /// The application's context, as passed to `read_index` or `lease_read`.
    pub context: Bytes,
}

/// A message raft wants sent, and whether it may only leave once the state that produced it is
/// persisted.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) msg: Message,
    /// Sent by a non-leader: a vote or an append acknowledgement promises persisted state.
    pub(crate) after_persist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CampaignKind {
    PreElection,
    Election,
    Transfer,
}

/// A snapshot a follower is receiving, piece by piece.
#[derive(Debug)]
struct SnapshotReceive {
    meta: crate::types::SnapshotMeta,
    total_len: u64,
    data: Vec<u8>,
}

/// A read-index request waiting for a quorum of heartbeat answers.
#[derive(Debug)]
struct PendingRead {
    seq: u64,
    index: LogIndex,
    context: Bytes,
}

/// xorshift64*: the random source of election timeouts, seeded by the config. Deterministic so
/// that a simulation replays from its seed.
#[derive(Debug, Clone)]
struct ElectionRng(u64);

impl ElectionRng {
    fn new(seed: u64) -> ElectionRng {
        // splitmix64 step so that small seeds spread.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ElectionRng((z ^ (z >> 31)) | 1)
    }

    fn below(&mut self, bound: u32) -> u32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32 % bound.max(1)
    }
}

/// One raft peer.
#[derive(Debug)]
pub struct Raft<S: LogStorage> {
    /// This peer.
    pub id: NodeId,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Current role.
    pub state: StateRole,
    /// The leader of the current term, when known.
    pub leader: Option<NodeId>,
    /// The log.
    pub log: RaftLog<S>,
    /// Membership as of the last applied configuration change.
    pub(crate) conf: ConfState,
    /// Leader: one entry per member, this peer included.
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    /// Granted vote responses counted with duplicates (only for `CountDuplicateVotes`).
    duplicate_grants: usize,
    pub(crate) outbox: Vec<Outgoing>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    /// Ticks since start; the leader's clock for leases.
    now_tick: u64,
    /// Ticks since start, capped: until one election timeout has passed this peer does not know
    /// whether it granted a leader a lease before a restart, so it votes for nobody new.
    ticks_since_start: u32,
    rng: ElectionRng,
    config: Config,
    /// Index of the latest configuration-change entry; a new change waits until it is applied.
    pending_conf_index: LogIndex,
    lead_transferee: Option<NodeId>,
    /// Leader: a TimeoutNow was sent in this term, so another leader may appear without
    /// waiting out the lease; lease reads are refused for the rest of the term.
    lease_voided: bool,
    /// Leader: new entries wait to be broadcast in one append per follower.
    pub(crate) needs_broadcast: bool,
    /// Leader: sizes of entries proposed and not yet committed, oldest first.
    uncommitted: VecDeque<(LogIndex, u64)>,
    uncommitted_bytes: u64,
    /// Leader: the latest read-index round.
    read_seq: u64,
    pending_reads: VecDeque<PendingRead>,
    /// Leader: reads asked before an entry of this term committed.
    reads_waiting_commit: Vec<(Bytes, bool)>,
    /// Reads the application may serve.
    pub read_states: Vec<ReadState>,
    /// No heartbeats and no election timer: the group is idle.
    quiescent: bool,
    idle_ticks: u32,
    /// Leader: lease acknowledgements older than this tick do not count (quiescence).
    lease_floor_tick: u64,
    snapshot_receive: Option<SnapshotReceive>,
}

impl<S: LogStorage> Raft<S> {
    /// A peer over `storage`, as a follower in the persisted term.
    pub fn new(config: Config, storage: S) -> Result<Raft<S>, RaftError> {
        config.validate()?;
        let (hard_state, _) = storage.initial_state()?;
        let conf = storage.initial_state()?.1;
        let log = RaftLog::new(storage, hard_state.commit, config.applied)?;
        let mut raft = Raft {
            id: config.id,
            term: hard_state.term,
            vote: hard_state.vote,
            state: StateRole::Follower,
            leader: None,
            log,
            conf: ConfState::default(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            duplicate_grants: 0,
            outbox: Vec::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_tick,
            now_tick: 0,
            ticks_since_start: 0,
            rng: ElectionRng::new(config.rng_seed),
            pending_conf_index: LogIndex(0),
            lead_transferee: None,
            lease_voided: false,
            needs_broadcast: false,
            uncommitted: VecDeque::new(),
            uncommitted_bytes: 0,
            read_seq: 0,
            pending_reads: VecDeque::new(),
            reads_waiting_commit: Vec::new(),
            read_states: Vec::new(),
            quiescent: false,
            idle_ticks: 0,
            lease_floor_tick: 0,
            snapshot_receive: None,
            config,
        };
        raft.set_conf(conf);
        raft.become_follower(raft.term, None);
        if raft.term.0 <= 1 {
            // Leaders exist from term 2 on (a group starts at term 0 or 1): this peer never
            // acknowledged one, so it owes no lease.
            raft.ticks_since_start = raft.config.election_tick;
        }
        Ok(raft)
    }

    /// The configuration in force.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// The hard state to persist.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    /// Whether the group is idle (no heartbeats, no election timer).
    pub fn is_quiescent(&self) -> bool {
        self.quiescent
    }

    /// The leader's replication view of `id`.
    pub fn progress(&self, id: NodeId) -> Option<&Progress> {
        self.progress.get(&id)
    }

    /// The peer being made leader, while a transfer is under way.
    pub fn lead_transferee(&self) -> Option<NodeId> {
        self.lead_transferee
    }

    fn promotable(&self) -> bool {
        self.conf.voters.contains(&self.id) || self.conf.voters_outgoing.contains(&self.id)
    }

    fn new_progress(&self) -> Progress {
        Progress::new(
            self.log.last_index().next(),
            self.config.max_inflight_msgs,
            self.config.max_inflight_bytes,
        )
    }

    /// Installs `conf`, adding progress for new members and dropping removed ones.
    fn set_conf(&mut self, conf: ConfState) {
        let members = conf.all_members();
        self.progress.retain(|id, _| members.contains(id));
        for id in members {
            if !self.progress.contains_key(&id) {
                let mut progress = self.new_progress();
                progress.recent_active = true;
                self.progress.insert(id, progress);
            }
        }
        self.conf = conf;
    }

    fn send(&mut self, msg: Message) {
        let after_persist = self.state != StateRole::Leader
            && self.config.fault != Some(InjectedBug::AcknowledgeBeforePersisting);
        self.outbox.push(Outgoing { msg, after_persist });
    }

    fn message(&self, msg_type: MessageType, to: NodeId) -> Message {
        Message::new(msg_type, self.id, to, self.term)
    }

    fn reset_randomized_election_timeout(&mut self) {
        self.randomized_election_timeout =
            self.config.election_tick + self.rng.below(self.config.election_tick);
    }

    fn reset(&mut self, term: Term) {
        if self.term != term {
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.votes.clear();
        self.duplicate_grants = 0;
        self.lead_transferee = None;
        self.lease_voided = false;
        self.needs_broadcast = false;
        self.uncommitted.clear();
        self.uncommitted_bytes = 0;
        self.pending_reads.clear();
        self.reads_waiting_commit.clear();
        self.idle_ticks = 0;
        let last = self.log.last_index();
        let (msgs, bytes) = (
            self.config.max_inflight_msgs,
            self.config.max_inflight_bytes,
        );
        for (id, progress) in self.progress.iter_mut() {
            *progress = Progress::new(last.next(), msgs, bytes);
            if *id == self.id {
                progress.matched = self.log.persisted;
                progress.recent_active = true;
            }
        }
    }

    /// Becomes a follower in `term`, of `leader` when known.
    pub fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.state = StateRole::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert!(
            self.state != StateRole::Leader,
            "a leader does not pre-campaign"
        );
        // Term and vote stay: a pre-vote changes nothing persistent.
        self.state = StateRole::PreCandidate;
        self.votes.clear();
        self.duplicate_grants = 0;
        self.leader = None;
    }

    fn become_candidate(&mut self) {
        assert!(
            self.state != StateRole::Leader,
            "a leader does not campaign"
        );
        self.reset(Term(self.term.0.saturating_add(1)));
        self.vote = Some(self.id);
        self.state = StateRole::Candidate;
    }

    fn become_leader(&mut self) {
        assert!(
            self.state == StateRole::Candidate,
            "only a candidate becomes leader"
        );
        let term = self.term;
        self.reset(term);
        self.state = StateRole::Leader;
        self.leader = Some(self.id);
        self.lease_floor_tick = self.now_tick;
        // Configuration entries in the uncommitted tail take effect when applied; none may be
        // proposed before they are (thesis §4.1 safety with apply-time changes).
        self.pending_conf_index = self.log.last_index();
        // An entry of the new term lets the leader commit earlier terms' entries (§5.4.2).
        let noop = Entry {
            term,
            index: self.log.last_index().next(),
            kind: EntryKind::Normal,
            data: Bytes::new(),
        };
        self.append_entries(vec![noop]);
    }

    /// Advances the clock by one tick.
    pub fn tick(&mut self) {
        self.now_tick += 1;
        if self.ticks_since_start < self.config.election_tick {
            self.ticks_since_start += 1;
        }
        match self.state {
            StateRole::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
    }

    fn tick_election(&mut self) {
        if self.quiescent {
            return;
        }
        self.election_elapsed += 1;
        if self.promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.reset_randomized_election_timeout();
            let kind = if self.config.pre_vote {
                CampaignKind::PreElection
            } else {
                CampaignKind::Election
            };
            self.campaign(kind);
        }
    }

    fn tick_leader(&mut self) {
        if self.quiescent {
            return;
        }
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.config.election_tick {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                let active = quorum::is_quorum(&self.conf, |id| {
                    self.progress.get(&id).is_some_and(|p| p.recent_active)
                });
                if !active {
                    // CheckQuorum: a leader cut off from a quorum steps down (thesis §6.2).
                    let term = self.term;
                    self.become_follower(term, None);
                    return;
                }
                let me = self.id;
                for (id, progress) in self.progress.iter_mut() {
                    progress.recent_active = *id == me;
                }
            }
            // A transfer that did not finish within an election timeout is abandoned.
            self.lead_transferee = None;
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat(false);
        }
        self.tick_snapshot_retries();
        self.maybe_quiesce();
    }

    fn tick_snapshot_retries(&mut self) {
        let retry = self.config.snapshot_retry_ticks;
        let mut stalled = Vec::new();
        for (id, progress) in self.progress.iter_mut() {
            if progress.state == ProgressState::Snapshot {
                progress.snapshot_idle_ticks += 1;
                if progress.snapshot_idle_ticks >= retry {
                    // A piece (or its answer) was lost: resume from what was confirmed.
                    progress.snapshot_idle_ticks = 0;
                    progress.snapshot_sent = progress.snapshot_acked;
                    stalled.push(*id);
                }
            }
        }
        for id in stalled {
            self.send_snapshot_pieces(id);
        }
    }

    fn maybe_quiesce(&mut self) {
        if self.config.quiesce_after_ticks == 0 {
            return;
        }
        let last = self.log.last_index();
        let idle = self.lead_transferee.is_none()
            && self.pending_reads.is_empty()
            && self.reads_waiting_commit.is_empty()
            && self.log.committed == last
            && self.log.persisted == last
            && !self.conf.is_joint()
            && self.pending_conf_index <= self.log.applied
            && self.progress.iter().all(|(id, p)| {
                *id == self.id
                    || (p.matched == last
                        && p.commit_acked == last
                        && p.state == ProgressState::Replicate)
            });
        if !idle {
            self.idle_ticks = 0;
            return;
        }
        self.idle_ticks += 1;
        if self.idle_ticks >= self.config.quiesce_after_ticks {
            self.broadcast_heartbeat(true);
            self.quiescent = true;
        }
    }

    /// Leaves quiescence: the leader resumes heartbeats (and re-proves its lease), a follower
    /// restarts its election timer. The driver calls it when it suspects a peer failed; any
    /// message, proposal or request also wakes the group.
    pub fn wake(&mut self) {
        if !self.quiescent {
            return;
        }
        self.quiescent = false;
        self.idle_ticks = 0;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        if self.state == StateRole::Leader {
            self.lease_floor_tick = self.now_tick;
            let me = self.id;
            for (id, progress) in self.progress.iter_mut() {
                progress.recent_active = *id == me;
            }
            self.broadcast_heartbeat(false);
        }
    }

    fn campaign(&mut self, kind: CampaignKind) {
        let vote_term = match kind {
            CampaignKind::PreElection => {
                self.become_pre_candidate();
                Term(self.term.0.saturating_add(1))
            }
            _ => {
                self.become_candidate();
                self.term
            }
        };
        let (vote_type, response_type) = if kind == CampaignKind::PreElection {
            (
                MessageType::RequestPreVote,
                MessageType::RequestPreVoteResponse,
            )
        } else {
            (MessageType::RequestVote, MessageType::RequestVoteResponse)
        };
        let me = self.id;
        if self.poll(me, response_type, true) == VoteResult::Won {
            // A group of one wins at once.
            self.on_election_won(kind);
            return;
        }
        let last_index = self.log.last_index();
        let last_term = self.log.last_term();
        for voter in self.conf.all_voters() {
            if voter == self.id {
                continue;
            }
            let mut msg = Message::new(vote_type, self.id, voter, vote_term);
            msg.index = last_index;
            msg.log_term = last_term;
            msg.transfer = kind == CampaignKind::Transfer;
            self.send(msg);
        }
    }

    fn on_election_won(&mut self, kind: CampaignKind) {
        if kind == CampaignKind::PreElection {
            self.campaign(CampaignKind::Election);
        } else {
            self.become_leader();
            self.broadcast_append();
        }
    }

    fn poll(&mut self, from: NodeId, _response: MessageType, granted: bool) -> VoteResult {
        let first_answer = !self.votes.contains_key(&from);
        if first_answer {
            self.votes.insert(from, granted);
        }
        if self.config.fault == Some(InjectedBug::CountDuplicateVotes) {
            if granted && from != self.id {
                self.duplicate_grants += 1;
            }
            let voters = self.conf.voters.len();
            if self.duplicate_grants + 1 > voters / 2 {
                return VoteResult::Won;
            }
        }
        quorum::vote_result(&self.conf, &self.votes)
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, msg: Message) -> Result<(), RaftError> {
        if msg.to != self.id {
            return Err(RaftError::WrongRecipient {
                to: msg.to,
                me: self.id,
            });
        }
        if msg.term.0 == u64::MAX {
            // No election can follow a term that cannot be incremented: not a real message.
            return Ok(());
        }
        let was_quiescent = self.quiescent;
        // Answers to heartbeats (the quiescing one included) and the quiescing heartbeat itself
        // must not wake the group, or it would never stay asleep.
        let keeps_quiet = msg.msg_type == MessageType::HeartbeatResponse
            || (msg.msg_type == MessageType::Heartbeat && msg.quiesce);
        if !keeps_quiet {
            self.wake();
        }
        if msg.term > self.term {
            if matches!(
                msg.msg_type,
                MessageType::RequestVote | MessageType::RequestPreVote
            ) {
                // A peer that heard from a live leader within the minimum election timeout
                // (or cannot tell, just after a restart) refuses to help depose it: this is
                // what makes the leader's lease hold (thesis §6.4.1, §9.6).
                let recently_heard = (self.leader.is_some()
                    && self.election_elapsed < self.config.election_tick
                    && !was_quiescent)
                    || self.ticks_since_start < self.config.election_tick;
                if self.config.check_quorum && recently_heard && !msg.transfer {
                    return Ok(());
                }
            }
            match msg.msg_type {
                MessageType::RequestPreVote => {}
                MessageType::RequestPreVoteResponse if !msg.reject => {}
                _ => {
                    let leader = match msg.msg_type {
                        MessageType::Append | MessageType::Heartbeat | MessageType::Snapshot => {
                            Some(msg.from)
                        }
                        _ => None,
                    };
                    self.become_follower(msg.term, leader);
                }
            }
        } else if msg.term < self.term {
            if (self.config.check_quorum || self.config.pre_vote)
                && matches!(msg.msg_type, MessageType::Append | MessageType::Heartbeat)
            {
                // Tell a deposed leader about the newer term so it steps down; with pre-vote
                // and check-quorum it would not learn it from a vote request.
                let reply = self.message(MessageType::AppendResponse, msg.from);
                self.send(reply);
            } else if msg.msg_type == MessageType::RequestPreVote {
                let mut reply = self.message(MessageType::RequestPreVoteResponse, msg.from);
                reply.reject = true;
                self.send(reply);
            }
            return Ok(());
        }

        match msg.msg_type {
            MessageType::RequestVote | MessageType::RequestPreVote => {
                self.handle_vote_request(msg);
                Ok(())
            }
            _ => match self.state {
                StateRole::Leader => self.step_leader(msg),
                StateRole::Candidate | StateRole::PreCandidate => self.step_candidate(msg),
                StateRole::Follower => self.step_follower(msg),
            },
        }
    }

    fn handle_vote_request(&mut self, msg: Message) {
        let pre_vote = msg.msg_type == MessageType::RequestPreVote;
        let response_type = if pre_vote {
            MessageType::RequestPreVoteResponse
        } else {
            MessageType::RequestVoteResponse
        };
        // §5.2: one vote per term, first come first served; a pre-vote for a later term may
        // be granted whatever this peer voted.
        let can_vote = self.vote == Some(msg.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && msg.term > self.term);
        // §5.4.1: only for a candidate whose log is at least as up to date.
        let up_to_date = self.config.fault == Some(InjectedBug::SkipLogUpToDateCheck)
            || self.log.is_up_to_date(msg.index, msg.log_term);
        let mut reply = Message::new(response_type, self.id, msg.from, self.term);
        if can_vote && up_to_date {
            reply.term = msg.term;
            if !pre_vote {
                self.election_elapsed = 0;
                self.vote = Some(msg.from);
            }
        } else {
            reply.reject = true;
        }
        self.send(reply);
    }

    fn step_candidate(&mut self, msg: Message) -> Result<(), RaftError> {
        match msg.msg_type {
            MessageType::Append | MessageType::Heartbeat | MessageType::Snapshot => {
                // A leader of this term exists (§5.2).
                self.become_follower(msg.term, Some(msg.from));
                self.step_follower(msg)
            }
            MessageType::RequestVoteResponse | MessageType::RequestPreVoteResponse => {
                let expected = if self.state == StateRole::PreCandidate {
                    MessageType::RequestPreVoteResponse
                } else {
                    MessageType::RequestVoteResponse
                };
                if msg.msg_type != expected {
                    return Ok(());
                }
                match self.poll(msg.from, msg.msg_type, !msg.reject) {
                    VoteResult::Won => {
                        let kind = if self.state == StateRole::PreCandidate {
                            CampaignKind::PreElection
                        } else {
                            CampaignKind::Election
                        };
                        self.on_election_won(kind);
                    }
                    VoteResult::Lost => {
                        let term = self.term;
                        self.become_follower(term, None);
                    }
                    VoteResult::Pending => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn step_follower(&mut self, msg: Message) -> Result<(), RaftError> {
        match msg.msg_type {
            MessageType::Append => {
                self.election_elapsed = 0;
                self.leader = Some(msg.from);
                self.handle_append(msg);
            }
            MessageType::Heartbeat => {
                self.election_elapsed = 0;
                self.leader = Some(msg.from);
                self.handle_heartbeat(msg);
            }
            MessageType::Snapshot => {
                self.election_elapsed = 0;
                self.leader = Some(msg.from);
                self.handle_snapshot(msg);
            }
            // The leader hands over (thesis §3.10): campaign at once, past leases.
            MessageType::TimeoutNow if self.promotable() => {
                self.campaign(CampaignKind::Transfer);
            }
            _ => {}
        }
        Ok(())
    }

    fn handle_append(&mut self, msg: Message) {
        // Entries must follow `index` one by one, in terms no later than the sender's: a
        // message that breaks this did not come from a correct leader and is dropped.
        let well_formed = msg.entries.iter().enumerate().all(|(i, entry)| {
            msg.index.0.checked_add(1 + i as u64) == Some(entry.index.0) && entry.term <= msg.term
        });
        if !well_formed {
            return;
        }
        let mut reply = self.message(MessageType::AppendResponse, msg.from);
        if msg.index < self.log.committed {
            reply.index = self.log.committed;
            reply.commit = self.log.committed;
            self.send(reply);
            return;
        }
        match self
            .log
            .maybe_append(msg.index, msg.log_term, msg.commit, &msg.entries)
        {
            Some(last_new) => {
                reply.index = last_new;
            }
            None => {
                // Fast back-off (thesis §5.3 optimisation): point the leader at the last index
                // whose term is at most the rejected entry's term.
                let hint_index = msg.index.min(self.log.last_index());
                let hint_index = self.log.find_conflict_by_term(hint_index, msg.log_term);
                reply.reject = true;
                reply.index = msg.index;
                reply.reject_hint = hint_index;
                reply.log_term = self.log.term(hint_index).unwrap_or(Term(0));
            }
        }
        reply.commit = self.log.committed;
        self.send(reply);
    }

    fn handle_heartbeat(&mut self, msg: Message) {
        // The leader sends min(commit, what it knows we match), so this never commits an
        // entry we do not hold from it.
        let commit = msg.commit.min(self.log.last_index());
        self.log.commit_to(commit);
        let mut reply = self.message(MessageType::HeartbeatResponse, msg.from);
        reply.read_seq = msg.read_seq;
        reply.sent_tick = msg.sent_tick;
        reply.commit = self.log.committed;
        self.send(reply);
        if msg.quiesce && self.log.committed == msg.commit && self.log.last_index() == msg.commit {
            self.quiescent = true;
        }
    }

    fn handle_snapshot(&mut self, msg: Message) {
        let Some(piece) = msg.snapshot else { return };
        let meta = piece.meta.clone();
        if meta.index.0 == u64::MAX || meta.term > msg.term || meta.conf_state.voters.is_empty() {
            return;
        }
        if meta.index <= self.log.committed {
            // Already have all of it.
            self.snapshot_receive = None;
            let mut reply = self.message(MessageType::AppendResponse, msg.from);
            reply.index = self.log.committed;
            reply.commit = self.log.committed;
            self.send(reply);
            return;
        }
        let same_snapshot = self
            .snapshot_receive
            .as_ref()
            .is_some_and(|r| r.meta == meta && r.total_len == piece.total_len);
        if !same_snapshot {
            self.snapshot_receive = None;
            if piece.offset == 0 {
                self.snapshot_receive = Some(SnapshotReceive {
                    meta: meta.clone(),
                    total_len: piece.total_len,
                    data: Vec::new(),
                });
            }
        }
        let received = self
            .snapshot_receive
            .as_ref()
            .map_or(0, |r| r.data.len() as u64);
        let mut reply = self.message(MessageType::SnapshotResponse, msg.from);
        reply.index = meta.index;
        reply.log_term = meta.term;
        let Some(receive) = self.snapshot_receive.as_mut() else {
            reply.reject = true;
            reply.snapshot_offset = 0;
            self.send(reply);
            return;
        };
        if piece.offset != received || received + piece.data.len() as u64 > receive.total_len {
            // Out of order (a piece was lost or duplicated): ask to resume from here.
            reply.reject = true;
            reply.snapshot_offset = received;
            self.send(reply);
            return;
        }
        receive.data.extend_from_slice(&piece.data);
        let received = receive.data.len() as u64;
        if received < receive.total_len {
            reply.snapshot_offset = received;
            self.send(reply);
            return;
        }
        let Some(done) = self.snapshot_receive.take() else {
            return;
        };
        let snapshot = Snapshot {
            meta: done.meta,
            data: Bytes::from(done.data),
        };
        let restored = self.restore(snapshot);
        let mut reply = self.message(MessageType::AppendResponse, msg.from);
        reply.index = if restored {
            self.log.last_index()
        } else {
            self.log.committed
        };
        reply.commit = self.log.committed;
        self.send(reply);
    }

    /// Replaces the log and the membership by `snapshot`, unless the log already holds its
    /// last entry (then it only commits up to it).
    fn restore(&mut self, snapshot: Snapshot) -> bool {
        let meta = &snapshot.meta;
        if meta.index <= self.log.committed {
            return false;
        }
        if self.log.match_term(meta.index, meta.term) {
            self.log.commit_to(meta.index);
            return false;
        }
        let conf = meta.conf_state.clone();
        self.log.restore(snapshot);
        self.set_conf(conf);
        true
    }

    fn step_leader(&mut self, msg: Message) -> Result<(), RaftError> {
        let from = msg.from;
        let Some(progress) = self.progress.get_mut(&from) else {
            return Ok(());
        };
        progress.recent_active = true;
        match msg.msg_type {
            MessageType::AppendResponse => self.handle_append_response(msg),
            MessageType::HeartbeatResponse => self.handle_heartbeat_response(msg),
            MessageType::SnapshotResponse => self.handle_snapshot_response(msg),
            _ => {}
        }
        Ok(())
    }

    fn handle_append_response(&mut self, msg: Message) {
        let from = msg.from;
        let last = self.log.last_index();
        if msg.index > last || msg.commit > last {
            // Claims entries this leader never had: not an answer to anything it sent.
            return;
        }
        let next_probe = if msg.reject && msg.log_term.0 > 0 {
            self.log
                .find_conflict_by_term(msg.reject_hint, msg.log_term)
        } else {
            msg.reject_hint
        };
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.commit_acked = progress.commit_acked.max(msg.commit);
        if msg.reject {
            if progress.maybe_decrease_to(msg.index, next_probe) {
                if progress.state == ProgressState::Replicate {
                    progress.become_probe();
                }
                self.send_append(from, true);
            }
            return;
        }
        let was_paused = progress.is_paused();
        if !progress.maybe_update(msg.index) {
            if was_paused && !progress.is_paused() {
                self.send_append(from, false);
            }
            return;
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot if progress.matched >= progress.pending_snapshot => {
                progress.become_probe();
                progress.become_replicate();
            }
            ProgressState::Snapshot => {}
            ProgressState::Replicate => progress.inflights.free_to(msg.index),
        }
        let matched = progress.matched;
        if self.maybe_commit() {
            self.needs_broadcast = true;
        }
        self.send_append(from, false);
        if self.lead_transferee == Some(from) && matched == last {
            self.send_timeout_now(from);
        }
    }

    fn handle_heartbeat_response(&mut self, msg: Message) {
        let from = msg.from;
        let last = self.log.last_index();
        let floor = self.lease_floor_tick;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        // Echoes of rounds and ticks this leader has not reached yet are bogus: ignore them
        // rather than let them confirm reads or extend the lease.
        if msg.read_seq > self.read_seq || msg.sent_tick > self.now_tick || msg.commit > last {
            return;
        }
        progress.commit_acked = progress.commit_acked.max(msg.commit);
        progress.read_seq_acked = progress.read_seq_acked.max(msg.read_seq);
        if msg.sent_tick >= floor {
            progress.lease_tick_acked = progress.lease_tick_acked.max(msg.sent_tick);
        }
        match progress.state {
            ProgressState::Probe => progress.probe_sent = false,
            // Appends in the window may be lost; free a slot so the next append goes out and
            // its rejection (if any) brings the follower back to probing.
            ProgressState::Replicate if progress.inflights.full() => {
                progress.inflights.free_first_one()
            }
            _ => {}
        }
        let behind = progress.matched < last || progress.commit_acked < self.log.committed;
        if behind {
            self.send_append(from, true);
        }
        self.release_confirmed_reads();
    }

    fn handle_snapshot_response(&mut self, msg: Message) {
        let from = msg.from;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        if progress.state != ProgressState::Snapshot || msg.index != progress.pending_snapshot {
            return;
        }
        progress.snapshot_idle_ticks = 0;
        let offset = msg.snapshot_offset.min(progress.snapshot_total);
        if msg.reject {
            // The follower lost pieces (or restarted): resume from what it holds.
            progress.snapshot_acked = offset;
            progress.snapshot_sent = offset;
        } else {
            progress.snapshot_acked = progress.snapshot_acked.max(offset);
            progress.snapshot_sent = progress.snapshot_sent.max(progress.snapshot_acked);
        }
        self.send_snapshot_pieces(from);
    }

    fn send_timeout_now(&mut self, to: NodeId) {
        // From here another leader may be elected at once: no more lease reads this term.
        self.lease_voided = true;
        let msg = self.message(MessageType::TimeoutNow, to);
        self.send(msg);
    }

    /// Leader: commits the quorum's match point if it is in this term.
    fn maybe_commit(&mut self) -> bool {
        let index = quorum::quorum_value(&self.conf, |id| {
            self.progress.get(&id).map_or(0, |p| p.matched.0)
        });
        let committed = self.log.maybe_commit(LogIndex(index), self.term);
        if committed {
            let commit = self.log.committed;
            while let Some((index, bytes)) = self.uncommitted.front().copied() {
                if index > commit {
                    break;
                }
                self.uncommitted.pop_front();
                self.uncommitted_bytes -= bytes;
            }
            self.serve_reads_waiting_commit();
        }
        committed
    }

    fn committed_in_term(&self) -> bool {
        self.log
            .term(self.log.committed)
            .map(|t| t == self.term)
            .unwrap_or(false)
    }

    /// Sends appends to `to` as its progress allows: one probe, or a pipeline of appends up to
    /// the in-flight window. With `send_empty`, an append goes out even without entries (to
    /// carry the commit index or find the match point).
    pub(crate) fn send_append(&mut self, to: NodeId, send_empty: bool) {
        if to == self.id {
            return;
        }
        let mut send_empty = send_empty;
        loop {
            let Some(progress) = self.progress.get(&to) else {
                return;
            };
            if progress.is_paused() {
                return;
            }
            let next = progress.next;
            let last = self.log.last_index();
            let prev_index = LogIndex(next.0 - 1);
            let prev_term = match self.log.term(prev_index) {
                Ok(term) => term,
                Err(StorageError::Compacted) => return self.start_snapshot(to),
                Err(_) => return,
            };
            let entries = match self
                .log
                .entries(next, last.next(), self.config.max_size_per_msg)
            {
                Ok(entries) => entries,
                Err(StorageError::Compacted) => return self.start_snapshot(to),
                // Not fetched yet: retried on the next heartbeat answer or fetch report.
                Err(_) => return,
            };
            if entries.is_empty() && !send_empty {
                return;
            }
            send_empty = false;
            let bytes: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
            let last_sent = entries.last().map(|e| e.index);
            let mut msg = self.message(MessageType::Append, to);
            msg.index = prev_index;
            msg.log_term = prev_term;
            msg.commit = self.log.committed;
            msg.entries = entries;
            self.send(msg);
            let Some(progress) = self.progress.get_mut(&to) else {
                return;
            };
            match progress.state {
                ProgressState::Replicate => {
                    let Some(last_sent) = last_sent else { return };
                    progress.next = last_sent.next();
                    progress.inflights.add(last_sent, bytes.max(1));
                }
                _ => {
                    progress.probe_sent = true;
                    return;
                }
            }
        }
    }

    fn start_snapshot(&mut self, to: NodeId) {
        let meta = match self.log.storage.snapshot_meta() {
            Ok(meta) if meta.index.0 > 0 => meta,
            _ => return,
        };
        let total = match self.log.storage.snapshot_piece(meta.index, 0, 0) {
            Ok(piece) => piece.total_len,
            Err(_) => return,
        };
        let Some(progress) = self.progress.get_mut(&to) else {
            return;
        };
        progress.become_snapshot(meta.index, total);
        self.send_snapshot_pieces(to);
    }

    /// Sends snapshot pieces to `to` from its `snapshot_sent`, keeping at most the in-flight
    /// window's worth of unconfirmed pieces.
    fn send_snapshot_pieces(&mut self, to: NodeId) {
        let piece_bytes = self.config.snapshot_piece_bytes;
        let window = piece_bytes.saturating_mul(self.config.max_inflight_msgs as u64);
        loop {
            let Some(progress) = self.progress.get(&to) else {
                return;
            };
            if progress.state != ProgressState::Snapshot {
                return;
            }
            let (index, sent, acked, total) = (
                progress.pending_snapshot,
                progress.snapshot_sent,
                progress.snapshot_acked,
                progress.snapshot_total,
            );
            // An empty snapshot still travels as one (empty) piece.
            let nothing_left = sent >= total && !(total == 0 && sent == 0 && acked == 0);
            if nothing_left || sent - acked >= window {
                return;
            }
            let piece = match self.log.storage.snapshot_piece(index, sent, piece_bytes) {
                Ok(piece) => piece,
                Err(StorageError::Unavailable) => {
                    // Storage no longer has it: start over with the latest snapshot.
                    if let Some(progress) = self.progress.get_mut(&to) {
                        progress.become_probe();
                    }
                    return self.start_snapshot(to);
                }
                Err(_) => return,
            };
            let meta = piece.meta.clone();
            let len = piece.data.len() as u64;
            let mut msg = self.message(MessageType::Snapshot, to);
            msg.snapshot = Some(Box::new(SnapshotChunk {
                meta,
                offset: sent,
                total_len: piece.total_len,
                data: piece.data,
            }));
            self.send(msg);
            let Some(progress) = self.progress.get_mut(&to) else {
                return;
            };
            progress.snapshot_sent = sent + len;
            if len == 0 {
                // An empty snapshot travels as one empty piece; mark it sent so that only a
                // retry (which resets `snapshot_sent` to the confirmed 0) sends it again.
                progress.snapshot_sent = u64::MAX;
                return;
            }
        }
    }

    /// Leader: sends pending entries to every follower.
    pub(crate) fn broadcast_append(&mut self) {
        self.needs_broadcast = false;
        let peers: Vec<NodeId> = self
            .progress
            .keys()
            .copied()
            .filter(|id| *id != self.id)
            .collect();
        for id in peers {
            self.send_append(id, true);
        }
    }

    fn broadcast_heartbeat(&mut self, quiesce: bool) {
        let peers: Vec<NodeId> = self
            .progress
            .keys()
            .copied()
            .filter(|id| *id != self.id)
            .collect();
        for id in peers {
            let matched = self.progress.get(&id).map_or(LogIndex(0), |p| p.matched);
            let mut msg = self.message(MessageType::Heartbeat, id);
            msg.commit = self.log.committed.min(matched);
            msg.read_seq = self.read_seq;
            msg.sent_tick = self.now_tick;
            msg.quiesce = quiesce;
            self.send(msg);
        }
    }

    fn append_entries(&mut self, mut entries: Vec<Entry>) {
        let mut index = self.log.last_index();
        for entry in entries.iter_mut() {
            index = index.next();
            entry.index = index;
            entry.term = self.term;
        }
        self.log.append(&entries);
        self.needs_broadcast = true;
    }

    /// The persisted log reached `(index, term)`: the leader counts itself for commitment only
    /// now (its own write runs in parallel with sending, thesis §10.2.1).
    pub(crate) fn on_persisted_entries(&mut self, index: LogIndex, term: Term) {
        self.log.stable_to(index, term);
        if self.state == StateRole::Leader {
            let persisted = self.log.persisted;
            if let Some(progress) = self.progress.get_mut(&self.id) {
                progress.matched = progress.matched.max(persisted);
                progress.next = progress.next.max(persisted.next());
            }
            if self.maybe_commit() {
                self.needs_broadcast = true;
            }
        }
    }

    fn ensure_leader(&self) -> Result<(), RaftError> {
        if self.state != StateRole::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        Ok(())
    }

    /// Proposes `data` as a new entry; returns its index. Entries proposed between two
    /// `ready()` calls travel to each follower in one append.
    pub fn propose(&mut self, data: Bytes) -> Result<LogIndex, RaftError> {
        self.propose_entry(EntryKind::Normal, data)
    }

    fn propose_entry(&mut self, kind: EntryKind, data: Bytes) -> Result<LogIndex, RaftError> {
        self.ensure_leader()?;
        if self.lead_transferee.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        let bytes = data.len() as u64;
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + bytes > self.config.max_uncommitted_bytes
        {
            return Err(RaftError::UncommittedLimit);
        }
        self.wake();
        let entry = Entry {
            term: self.term,
            index: LogIndex(0),
            kind,
            data,
        };
        self.append_entries(vec![entry]);
        let index = self.log.last_index();
        self.uncommitted.push_back((index, bytes));
        self.uncommitted_bytes += bytes;
        Ok(index)
    }

    /// Proposes a membership change. Refused while another change is not applied, or when it
    /// is not valid for the configuration it would follow.
    pub fn propose_conf_change(&mut self, change: &ConfChange) -> Result<LogIndex, RaftError> {
        self.ensure_leader()?;
        if self.pending_conf_index > self.log.applied {
            return Err(RaftError::ConfChangePending);
        }
        change.apply_to(&self.conf)?;
        let index = self.propose_entry(EntryKind::ConfChange, change.encode())?;
        self.pending_conf_index = index;
        Ok(index)
    }

    /// Applies a committed configuration change (the driver calls it when it applies the
    /// entry) and returns the new membership. A leader that is no longer a voter steps down;
    /// a joint configuration with `auto_leave` is left by a change the leader proposes once
    /// this one is applied.
    pub fn apply_conf_change(&mut self, change: &ConfChange) -> Result<ConfState, RaftError> {
        let next = change.apply_to(&self.conf)?;
        self.set_conf(next);
        if self.state == StateRole::Leader {
            if !self.promotable() {
                let term = self.term;
                self.become_follower(term, None);
            } else {
                if self.maybe_commit() {
                    self.needs_broadcast = true;
                }
                if let Some(transferee) = self.lead_transferee {
                    if !self.conf.all_voters().contains(&transferee) {
                        self.lead_transferee = None;
                    }
                }
            }
        }
        Ok(self.conf.clone())
    }

    /// Called when the state machine's applied index moves.
    pub(crate) fn on_applied(&mut self, index: LogIndex) {
        self.log.applied_to(index);
        if self.state == StateRole::Leader
            && self.conf.auto_leave
            && self.conf.is_joint()
            && self.pending_conf_index <= self.log.applied
        {
            // Leave the joint configuration on our own (thesis §4.3).
            let _ = self.propose_conf_change(&ConfChange::leave_joint());
        }
    }

    /// Hands leadership to `to` (thesis §3.10): proposals stop, `to` is caught up, then told
    /// to campaign at once.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), RaftError> {
        self.ensure_leader()?;
        if to == self.id {
            return Ok(());
        }
        if !self.conf.all_voters().contains(&to) {
            return Err(RaftError::NotVoter(to));
        }
        self.wake();
        if self.lead_transferee == Some(to) {
            return Ok(());
        }
        self.lead_transferee = Some(to);
        self.election_elapsed = 0;
        let caught_up = self
            .progress
            .get(&to)
            .is_some_and(|p| p.matched == self.log.last_index());
        if caught_up {
            self.send_timeout_now(to);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    /// Asks for a linearizable read (thesis §6.4): the leader confirms with a heartbeat round
    /// that it still leads, then a `ReadState` with the commit index at the time of the request
    /// comes out of `ready()`.
    pub fn read_index(&mut self, context: Bytes) -> Result<(), RaftError> {
        self.ensure_leader()?;
        if self.pending_reads.len() + self.reads_waiting_commit.len()
            >= self.config.max_pending_reads
        {
            return Err(RaftError::TooManyPendingReads);
        }
        self.wake();
        if !self.committed_in_term() {
            // The commit index is only known to be current once an entry of this term is
            // committed (thesis §6.4 step 1).
            self.reads_waiting_commit.push((context, false));
            return Ok(());
        }
        self.start_read(context);
        Ok(())
    }

    fn start_read(&mut self, context: Bytes) {
        let index = self.log.committed;
        if self.conf.all_voters().len() == 1 && self.conf.all_voters().contains(&self.id) {
            self.read_states.push(ReadState { index, context });
            return;
        }
        self.read_seq += 1;
        let seq = self.read_seq;
        self.pending_reads.push_back(PendingRead {
            seq,
            index,
            context,
        });
        self.broadcast_heartbeat(false);
    }

    fn serve_reads_waiting_commit(&mut self) {
        if self.reads_waiting_commit.is_empty() || !self.committed_in_term() {
            return;
        }
        for (context, lease) in std::mem::take(&mut self.reads_waiting_commit) {
            if lease && self.lease_valid() {
                let index = self.log.committed;
                self.read_states.push(ReadState { index, context });
            } else {
                self.start_read(context);
            }
        }
    }

    fn release_confirmed_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        let me = self.id;
        let current = self.read_seq;
        let confirmed = quorum::quorum_value(&self.conf, |id| {
            if id == me {
                current
            } else {
                self.progress.get(&id).map_or(0, |p| p.read_seq_acked)
            }
        });
        while let Some(read) = self.pending_reads.front() {
            if read.seq > confirmed {
                break;
            }
            let Some(read) = self.pending_reads.pop_front() else {
                break;
            };
            self.read_states.push(ReadState {
                index: read.index,
                context: read.context,
            });
        }
    }

    /// Whether the leader can prove, from heartbeat answers and its own clock, that no other
    /// leader can have been elected: a quorum answered heartbeats sent less than an election
    /// timeout (less the drift allowance) ago, and those voters refuse votes for that long.
    pub fn lease_valid(&self) -> bool {
        if self.state != StateRole::Leader
            || !self.config.check_quorum
            || self.quiescent
            || self.lease_voided
            || self.lead_transferee.is_some()
            || !self.committed_in_term()
        {
            return false;
        }
        let me = self.id;
        let now = self.now_tick;
        let floor = self.lease_floor_tick;
        let start = quorum::quorum_value(&self.conf, |id| {
            if id == me {
                now
            } else {
                self.progress.get(&id).map_or(0, |p| p.lease_tick_acked)
            }
        });
        if start < floor || start == 0 {
            return false;
        }
        // A follower refuses votes for `election_tick` of its own ticks after it received the
        // heartbeat; its first tick may come at once, hence the 1, and clocks drift.
        let lease_ticks = u64::from(self.config.election_tick - 1 - self.config.lease_drift_ticks);
        now < start + lease_ticks
    }

    /// A read served under the leader lease, without a heartbeat round: refused with
    /// `LeaseNotValid` when the lease cannot be proven (use `read_index` then).
    pub fn lease_read(&mut self, context: Bytes) -> Result<(), RaftError> {
        self.ensure_leader()?;
        if !self.lease_valid() {
            return Err(RaftError::LeaseNotValid);
        }
        let index = self.log.committed;
        self.read_states.push(ReadState { index, context });
        Ok(())
    }

    /// Starts an election at once, as if the election timeout had passed.
    pub(crate) fn force_election_timeout(&mut self) {
        if !self.promotable() {
            return;
        }
        self.quiescent = false;
        self.election_elapsed = 0;
        let kind = if self.config.pre_vote {
            CampaignKind::PreElection
        } else {
            CampaignKind::Election
        };
        self.campaign(kind);
    }

    pub(crate) fn committed_size_limit(&self) -> u64 {
        self.config.max_committed_size_per_ready
    }

    /// The driver has fetched entries that storage answered `TemporarilyUnavailable` for:
    /// retry sending appends.
    pub fn on_entries_fetched(&mut self) {
        self.log.on_entries_fetched();
        if self.state == StateRole::Leader {
            self.broadcast_append();
        }
    }
}
