//! A deterministic simulator of a raft group, in TigerBeetle's VOPR shape: one seed draws the
//! whole run (group size, network loss, duplication, delay, partitions, crashes, clock skew,
//! membership changes, leader transfers, snapshot sizes), a safety phase with faults is
//! followed by a liveness phase in which the healed group must converge, and independent
//! checkers look at every step:
//!
//! - election safety: at most one leader per term;
//! - log matching: two persisted entries with the same index and term carry the same data and
//!   follow entries of the same term;
//! - leader completeness: a new leader holds every entry committed in an earlier term;
//! - state-machine safety: every peer applies the same entry at each index;
//! - linearizability of the clients' history against a key-value store of registers.
//!
//! Every message crosses the wire codec. A failure reports the seed and the command that
//! replays it.
#![allow(dead_code)]

pub mod linearizability;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use bytes::Bytes;
use raftcore::{
    ConfChange, ConfChangeStep, ConfState, Config, Entry, EntryKind, HardState, InjectedBug,
    LogIndex, LogStorage, MemStorage, NodeId, RawNode, Snapshot, StateRole, Term,
};

use linearizability::{Operation, RegisterOp};

/// The simulator's own random source (splitmix64): the whole run follows from the seed.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[(self.next_u64() % items.len() as u64) as usize])
        }
    }
}

/// Which checker failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A raft safety property or linearizability broke.
    Correctness,
    /// The healed group did not converge in time.
    Liveness,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub at: u64,
    pub what: String,
}

/// What a run drew from its seed, printed with a failure.
#[derive(Debug, Clone)]
pub struct Params {
    pub voters: u64,
    pub spares: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub delay_max: u64,
    pub persist_delay_max: u64,
    pub crash: f64,
    pub partition: f64,
    pub membership: f64,
    pub transfer: f64,
    pub snapshot_interval: u64,
    pub safety_time: u64,
    pub liveness_time: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub quiesce_after_ticks: u32,
    pub inflight: usize,
    pub max_size_per_msg: u64,
    pub piece_bytes: u64,
    pub clients: u64,
    pub keys: u64,
}

impl Params {
    pub fn draw(rng: &mut SimRng) -> Params {
        Params {
            voters: *[3u64, 3, 5].get(rng.range(0, 2) as usize).unwrap_or(&3),
            spares: rng.range(0, 2),
            drop: [0.0, 0.02, 0.1, 0.25][rng.range(0, 3) as usize],
            duplicate: [0.0, 0.02, 0.1][rng.range(0, 2) as usize],
            delay_max: rng.range(1, 30),
            persist_delay_max: rng.range(0, 8),
            crash: [0.0, 0.0005, 0.002][rng.range(0, 2) as usize],
            partition: [0.0, 0.0005, 0.002][rng.range(0, 2) as usize],
            membership: [0.0, 0.001, 0.003][rng.range(0, 2) as usize],
            transfer: [0.0, 0.0005, 0.002][rng.range(0, 2) as usize],
            snapshot_interval: rng.range(5, 60),
            safety_time: rng.range(3_000, 8_000),
            liveness_time: 20_000,
            pre_vote: rng.chance(0.7),
            check_quorum: rng.chance(0.8),
            quiesce_after_ticks: if rng.chance(0.3) {
                rng.range(5, 30) as u32
            } else {
                0
            },
            inflight: rng.range(1, 8) as usize,
            max_size_per_msg: rng.range(16, 512),
            piece_bytes: rng.range(4, 64),
            clients: rng.range(2, 4),
            keys: rng.range(1, 4),
        }
    }
}

/// Options a test sets on top of what the seed draws.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub fault: Option<InjectedBug>,
    /// Override the number of initial voters.
    pub voters: Option<u64>,
    /// Override the duplication probability.
    pub duplicate: Option<f64>,
    /// Override the partition probability.
    pub partition: Option<f64>,
    /// Override the crash probability.
    pub crash: Option<f64>,
    /// Override the length of the safety phase.
    pub safety_time: Option<u64>,
}

#[derive(Debug)]
struct IoJob {
    complete_at: u64,
    number: u64,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
}

/// The key-value state machine: registers, and what the peer applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KvStore {
    values: BTreeMap<u64, u64>,
}

impl KvStore {
    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.values.len() * 16);
        for (key, value) in &self.values {
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
        Bytes::from(out)
    }

    fn decode(data: &[u8]) -> KvStore {
        let mut values = BTreeMap::new();
        for pair in data.chunks_exact(16) {
            let mut key = [0u8; 8];
            let mut value = [0u8; 8];
            key.copy_from_slice(&pair[..8]);
            value.copy_from_slice(&pair[8..]);
            values.insert(u64::from_le_bytes(key), u64::from_le_bytes(value));
        }
        KvStore { values }
    }
}

/// A write carried by an entry: op id, key, value.
fn encode_write(op_id: u64, key: u64, value: u64) -> Bytes {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&op_id.to_le_bytes());
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
    Bytes::from(out)
}

fn decode_write(data: &[u8]) -> Option<(u64, u64, u64)> {
    if data.len() != 24 {
        return None;
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    Some((word(0), word(1), word(2)))
}

fn hash_bytes(hash: &mut u64, data: &[u8]) {
    for byte in data {
        *hash ^= u64::from(*byte);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

struct SimNode {
    id: NodeId,
    raw: Option<RawNode<MemStorage>>,
    /// The disk while the peer is down.
    disk: Option<MemStorage>,
    kv: KvStore,
    applied: LogIndex,
    io: VecDeque<IoJob>,
    tick_period: u64,
    next_tick_at: u64,
    /// Reads asked of this peer: op id → (client, key, call, read index once known).
    reads: BTreeMap<u64, (u64, u64, u64, Option<LogIndex>)>,
    /// Removed from the group for good.
    retired: bool,

    restart_at: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct PendingOp {
    client: u64,
    node: NodeId,
    key: u64,
    call: u64,
    deadline: u64,
    value: u64,
    is_write: bool,
}

struct InFlight {
    from: NodeId,
    to: NodeId,
    bytes: Bytes,
}

pub struct World {
    pub seed: u64,
    pub params: Params,
    options: Options,
    rng: SimRng,
    now: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    network: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, InFlight>,
    message_seq: u64,
    partition: Option<BTreeSet<NodeId>>,
    partition_heal_at: u64,
    next_spare: u64,
    max_id: u64,
    /// Peers whose removal some peer applied.
    removed: Vec<NodeId>,
    // Checkers' state.
    leaders: BTreeMap<Term, NodeId>,
    max_leader_term: Term,
    persisted_entries: BTreeMap<(u64, u64), (u64, Term)>,
    /// index → (term, data hash, highest leader term when first applied).
    applied_log: BTreeMap<u64, (Term, u64, Term)>,
    // Clients.
    event_seq: u64,
    next_op_id: u64,
    client_busy: BTreeMap<u64, u64>,
    pending: BTreeMap<u64, PendingOp>,
    history: Vec<Operation>,
    liveness_writes_done: u64,
    pub trace_hash: u64,
    pub stats: Stats,
    /// Prints every delivered message from this time on (`RAFT_SIM_TRACE_FROM`).
    trace_from: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub delivered: u64,
    pub crashes: u64,
    pub conf_changes: u64,
    pub transfers: u64,
    pub snapshots_installed: u64,
    pub writes_ok: u64,
    pub reads_ok: u64,
    pub lease_reads_asked: u64,
    pub elections: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.delivered += other.delivered;
        self.crashes += other.crashes;
        self.conf_changes += other.conf_changes;
        self.transfers += other.transfers;
        self.snapshots_installed += other.snapshots_installed;
        self.writes_ok += other.writes_ok;
        self.reads_ok += other.reads_ok;
        self.lease_reads_asked += other.lease_reads_asked;
        self.elections += other.elections;
    }
}

impl World {
    pub fn new(seed: u64, options: Options) -> World {
        let mut rng = SimRng::new(seed);
        let mut params = Params::draw(&mut rng);
        if let Some(voters) = options.voters {
            params.voters = voters;
        }
        if let Some(duplicate) = options.duplicate {
            params.duplicate = duplicate;
        }
        if let Some(partition) = options.partition {
            params.partition = partition;
        }
        if let Some(crash) = options.crash {
            params.crash = crash;
        }
        if let Some(safety_time) = options.safety_time {
            params.safety_time = safety_time;
        }
        let voters: BTreeSet<NodeId> = (1..=params.voters).map(NodeId).collect();
        let conf = ConfState {
            voters: voters.clone(),
            ..ConfState::default()
        };
        let mut world = World {
            seed,
            max_id: params.voters,
            next_spare: params.voters + 1,
            removed: Vec::new(),
            params,
            options,
            rng,
            now: 0,
            nodes: BTreeMap::new(),
            network: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            message_seq: 0,
            partition: None,
            partition_heal_at: 0,
            leaders: BTreeMap::new(),
            max_leader_term: Term(0),
            persisted_entries: BTreeMap::new(),
            applied_log: BTreeMap::new(),
            event_seq: 0,
            next_op_id: 1,
            client_busy: BTreeMap::new(),
            pending: BTreeMap::new(),
            history: Vec::new(),
            liveness_writes_done: 0,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            stats: Stats::default(),
            trace_from: std::env::var("RAFT_SIM_TRACE_FROM")
                .ok()
                .and_then(|v| v.parse().ok()),
        };
        for id in voters {
            world.start_node(id, MemStorage::new_with_conf_state(conf.clone()));
        }
        world
    }

    fn config(&self, id: NodeId) -> Config {
        let mut config = Config::new(id);
        config.rng_seed = self.seed.wrapping_mul(1_000_003).wrapping_add(id.0);
        config.election_tick = 10;
        config.heartbeat_tick = 2;
        config.pre_vote = self.params.pre_vote;
        config.check_quorum = self.params.check_quorum;
        config.max_inflight_msgs = self.params.inflight;
        config.max_inflight_bytes = 4096;
        config.max_size_per_msg = self.params.max_size_per_msg;
        config.max_committed_size_per_ready = 256;
        config.snapshot_piece_bytes = self.params.piece_bytes;
        config.snapshot_retry_ticks = 5;
        // Clocks run 10% apart at most: over one election timeout that is one tick.
        config.lease_drift_ticks = 2;
        config.quiesce_after_ticks = self.params.quiesce_after_ticks;
        config.fault = self.options.fault;
        config
    }

    fn start_node(&mut self, id: NodeId, storage: MemStorage) {
        let tick_period = self.rng.range(9, 11);
        let kv = KvStore::decode(&storage.snapshot().data);
        let applied = storage.snapshot().meta.index;
        let raw = RawNode::new(self.config(id), storage).expect("valid config");
        let first_tick = self.now + self.rng.range(1, tick_period);
        let node = SimNode {
            id,
            raw: Some(raw),
            disk: None,
            kv,
            applied,
            io: VecDeque::new(),
            tick_period,
            next_tick_at: first_tick,
            reads: BTreeMap::new(),
            retired: false,
            restart_at: None,
        };
        self.nodes.insert(id, node);
    }

    fn trace(&mut self, tag: u64, data: &[u8]) {
        let mut h = self.trace_hash;
        hash_bytes(&mut h, &self.now.to_le_bytes());
        hash_bytes(&mut h, &tag.to_le_bytes());
        hash_bytes(&mut h, data);
        self.trace_hash = h;
    }

    fn fail(&self, kind: FailureKind, what: String) -> Failure {
        Failure {
            kind,
            at: self.now,
            what,
        }
    }

    fn connected(&self, from: NodeId, to: NodeId) -> bool {
        match &self.partition {
            Some(side) => side.contains(&from) == side.contains(&to),
            None => true,
        }
    }

    fn in_liveness(&self) -> bool {
        self.now >= self.params.safety_time
    }

    fn send(&mut self, msg: raftcore::Message) {
        let bytes = raftcore::encode_to_bytes(&msg);
        let faults = !self.in_liveness();
        if faults && self.rng.chance(self.params.drop) {
            return;
        }
        let copies = if faults && self.rng.chance(self.params.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.range(1, self.params.delay_max);
            self.message_seq += 1;
            let seq = self.message_seq;
            self.in_flight.insert(
                seq,
                InFlight {
                    from: msg.from,
                    to: msg.to,
                    bytes: bytes.clone(),
                },
            );
            self.network.push(Reverse((at, seq)));
        }
    }

    fn deliver_due(&mut self) -> Result<(), Failure> {
        while let Some(Reverse((at, seq))) = self.network.peek().copied() {
            if at > self.now {
                break;
            }
            self.network.pop();
            let Some(flight) = self.in_flight.remove(&seq) else {
                continue;
            };
            if !self.connected(flight.from, flight.to) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&flight.to) else {
                continue;
            };
            let Some(raw) = node.raw.as_mut() else {
                continue;
            };
            let msg = raftcore::decode(flight.bytes.clone()).map_err(|e| Failure {
                kind: FailureKind::Correctness,
                at,
                what: format!("codec: {e}"),
            })?;
            if node.retired {
                continue;
            }
            if self.trace_from.is_some_and(|from| at >= from) {
                println!(
                    "t={at} {}->{} {:?} term {} idx {} logterm {} commit {} reject {} hint {} \
                     off {} snap {:?}",
                    msg.from,
                    msg.to,
                    msg.msg_type,
                    msg.term,
                    msg.index,
                    msg.log_term,
                    msg.commit,
                    msg.reject,
                    msg.reject_hint,
                    msg.snapshot_offset,
                    msg.snapshot.as_ref().map(|s| (
                        s.meta.index,
                        s.offset,
                        s.data.len(),
                        s.total_len
                    ))
                );
            }
            raw.step(msg).map_err(|e| Failure {
                kind: FailureKind::Correctness,
                at,
                what: format!("step on {}: {e}", flight.to),
            })?;
            self.stats.delivered += 1;
            let (to, bytes) = (flight.to.0, flight.bytes);
            self.trace(to, &bytes);
        }
        Ok(())
    }

    /// Processes every ready of `id` (persisting through the delayed I/O queue).
    fn process_ready(&mut self, id: NodeId) -> Result<(), Failure> {
        for _ in 0..16 {
            let persist_delay = self.rng.range(0, self.params.persist_delay_max);
            let now = self.now;
            let node = self.nodes.get_mut(&id).expect("node");
            let Some(raw) = node.raw.as_mut() else {
                return Ok(());
            };
            if !raw.has_ready() {
                return Ok(());
            }
            let mut ready = raw.ready().map_err(|e| Failure {
                kind: FailureKind::Correctness,
                at: now,
                what: format!("ready on {id}: {e}"),
            })?;
            let messages = std::mem::take(&mut ready.messages);
            if ready.snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some() {
                let last_at = node.io.back().map_or(0, |j| j.complete_at);
                node.io.push_back(IoJob {
                    complete_at: (now + persist_delay).max(last_at),
                    number: ready.number,
                    snapshot: ready.snapshot.take(),
                    entries: std::mem::take(&mut ready.entries),
                    hard_state: ready.hard_state,
                });
            }
            if let Some(soft) = ready.soft_state {
                if soft.role == StateRole::Leader {
                    self.on_new_leader(id)?;
                }
            }
            self.apply(id, &ready.committed_entries)?;
            let node = self.nodes.get_mut(&id).expect("node");
            for read in ready.read_states {
                let mut op_id = [0u8; 8];
                if read.context.len() == 8 {
                    op_id.copy_from_slice(&read.context);
                }
                if let Some(entry) = node.reads.get_mut(&u64::from_le_bytes(op_id)) {
                    entry.3 = Some(read.index);
                }
            }
            for msg in messages {
                self.send(msg);
            }
        }
        Ok(())
    }

    fn on_new_leader(&mut self, id: NodeId) -> Result<(), Failure> {
        let raw = self.nodes[&id].raw.as_ref().expect("live");
        let term = raw.raft().term;
        self.stats.elections += 1;
        if let Some(other) = self.leaders.get(&term) {
            if *other != id {
                return Err(self.fail(
                    FailureKind::Correctness,
                    format!("election safety: {other} and {id} both lead term {term}"),
                ));
            }
        }
        self.leaders.insert(term, id);
        self.max_leader_term = self.max_leader_term.max(term);
        // Leader completeness: every entry committed in an earlier term is in its log.
        let log = &raw.raft().log;
        let first = log.first_index();
        for (index, (entry_term, _, bound)) in &self.applied_log {
            if *bound >= term || *index < first.0 {
                continue;
            }
            if log.term(LogIndex(*index)).ok() != Some(*entry_term) {
                return Err(self.fail(
                    FailureKind::Correctness,
                    format!(
                        "leader completeness: leader {id} of term {term} lacks committed entry \
                         {index} (term {entry_term})"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn apply(&mut self, id: NodeId, entries: &[Entry]) -> Result<(), Failure> {
        for entry in entries {
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            hash_bytes(&mut hash, &entry.data);
            match self.applied_log.get(&entry.index.0) {
                Some((term, data, _)) if (*term, *data) != (entry.term, hash) => {
                    return Err(self.fail(
                        FailureKind::Correctness,
                        format!(
                            "state machine safety: {id} applied ({}, term {}) where another peer \
                             applied term {term}",
                            entry.index, entry.term
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    self.applied_log
                        .insert(entry.index.0, (entry.term, hash, self.max_leader_term));
                }
            }
            let node = self.nodes.get_mut(&id).expect("node");
            if entry.index != node.applied.next() {
                return Err(Failure {
                    kind: FailureKind::Correctness,
                    at: self.now,
                    what: format!("{id} applied {} after {}", entry.index, node.applied),
                });
            }
            node.applied = entry.index;
            match entry.kind {
                EntryKind::ConfChange => {
                    let change = ConfChange::decode(entry.data.clone()).map_err(|e| Failure {
                        kind: FailureKind::Correctness,
                        at: self.now,
                        what: format!("conf change entry: {e}"),
                    })?;
                    let raw = node.raw.as_mut().expect("live");
                    raw.apply_conf_change(&change).map_err(|e| Failure {
                        kind: FailureKind::Correctness,
                        at: self.now,
                        what: format!("committed conf change refused on {id}: {e}"),
                    })?;
                    self.stats.conf_changes += 1;
                    for step in &change.steps {
                        if let ConfChangeStep::RemoveNode(removed) = step {
                            self.removed.push(*removed);
                        }
                    }
                }
                EntryKind::Normal => {
                    if let Some((op_id, key, value)) = decode_write(&entry.data) {
                        node.kv.values.insert(key, value);
                        if let Some(op) = self.pending.get(&op_id).copied() {
                            if op.node == id && op.is_write {
                                self.complete(op_id, None);
                            }
                        }
                    }
                }
            }
        }
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some(raw) = node.raw.as_mut() {
            if let Some(last) = entries.last() {
                raw.on_applied(last.index);
            }
            // Snapshot and compact now and then. A leader keeps the log a lagging member
            // still needs, unless the log grew four intervals long.
            let snapshot_index = raw.store().snapshot().meta.index;
            let interval = self.params.snapshot_interval;
            let raft = raw.raft();
            let lagging = raft.state == StateRole::Leader
                && raft.conf_state().all_members().iter().any(|peer| {
                    raft.progress(*peer)
                        .is_some_and(|p| p.matched < node.applied)
                });
            let due = if lagging { 4 * interval } else { interval };
            if node.applied.0 >= snapshot_index.0 + due {
                let conf = raw.raft().conf_state().clone();
                let data = node.kv.encode();
                let applied = node.applied;
                let _ = raw.store_mut().create_snapshot(applied, conf, data);
            }
        }
        Ok(())
    }

    fn complete(&mut self, op_id: u64, read_value: Option<Option<u64>>) {
        let Some(op) = self.pending.remove(&op_id) else {
            return;
        };
        self.event_seq += 1;
        let ret = self.event_seq;
        let register_op = match read_value {
            Some(value) => {
                self.stats.reads_ok += 1;
                RegisterOp::Read(value)
            }
            None => {
                self.stats.writes_ok += 1;
                if self.in_liveness() {
                    self.liveness_writes_done += 1;
                }
                RegisterOp::Write(op.value)
            }
        };
        self.history.push(Operation {
            key: op.key,
            call: op.call,
            ret,
            op: register_op,
        });
        self.client_busy.remove(&op.client);
    }

    fn complete_io(&mut self) -> Result<(), Failure> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            loop {
                let node = self.nodes.get_mut(&id).expect("node");
                let Some(job) = node.io.front() else { break };
                if job.complete_at > self.now || node.raw.is_none() {
                    break;
                }
                let Some(job) = node.io.pop_front() else {
                    break;
                };
                let raw = node.raw.as_mut().expect("live");
                if let Some(snapshot) = job.snapshot {
                    node.kv = KvStore::decode(&snapshot.data);
                    node.applied = snapshot.meta.index;
                    raw.store_mut().apply_snapshot(snapshot);
                    self.stats.snapshots_installed += 1;
                }
                raw.store_mut().append(&job.entries);
                if let Some(hard_state) = job.hard_state {
                    raw.store_mut().set_hard_state(hard_state);
                }
                raw.on_persisted(job.number);
                // Log matching over everything any peer ever persisted.
                for entry in &job.entries {
                    let prev_term = if entry.index.0 <= 1 {
                        Term(0)
                    } else {
                        raw.store()
                            .term(LogIndex(entry.index.0 - 1))
                            .unwrap_or(Term(u64::MAX))
                    };
                    let mut hash = 0xcbf2_9ce4_8422_2325u64;
                    hash_bytes(&mut hash, &entry.data);
                    let key = (entry.index.0, entry.term.0);
                    match self.persisted_entries.get(&key) {
                        Some((seen_hash, seen_prev))
                            if *seen_hash != hash
                                || (*seen_prev != prev_term
                                    && prev_term != Term(u64::MAX)
                                    && *seen_prev != Term(u64::MAX)) =>
                        {
                            return Err(Failure {
                                kind: FailureKind::Correctness,
                                at: self.now,
                                what: format!(
                                    "log matching: entry ({}, term {}) on {id} differs from \
                                     another peer's copy",
                                    entry.index, entry.term
                                ),
                            });
                        }
                        Some(_) => {}
                        None => {
                            self.persisted_entries.insert(key, (hash, prev_term));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn tick_nodes(&mut self) {
        for node in self.nodes.values_mut() {
            if node.next_tick_at <= self.now {
                node.next_tick_at = self.now + node.tick_period;
                if let Some(raw) = node.raw.as_mut() {
                    if !node.retired {
                        raw.tick();
                    }
                }
            }
        }
    }

    fn live_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.raw.is_some() && !n.retired)
            .map(|(id, _)| *id)
            .collect()
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.raw.as_ref().map(|r| (id, r)))
            .filter(|(_, r)| r.raft().state == StateRole::Leader)
            .max_by_key(|(_, r)| r.raft().term)
            .map(|(id, _)| *id)
    }

    fn crash(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(raw) = node.raw.take() else { return };
        node.disk = Some(raw.into_store());
        node.io.clear();
        node.reads.clear();
        node.kv = KvStore::default();
        self.stats.crashes += 1;
        let restart_at = self.now + self.rng.range(50, 1500);
        if let Some(node) = self.nodes.get_mut(&id) {
            node.restart_at = Some(restart_at);
        }
        self.trace(9_000_001, &id.0.to_le_bytes());
    }

    fn restart(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(disk) = node.disk.take() else { return };
        let retired = node.retired;
        self.start_node(id, disk);
        if let Some(node) = self.nodes.get_mut(&id) {
            node.retired = retired;
        }
        self.trace(9_000_002, &id.0.to_le_bytes());
    }

    fn inject_faults(&mut self) {
        let live = self.live_ids();
        if self.rng.chance(self.params.crash) {
            if let Some(id) = self.rng.pick(&live) {
                self.crash(id);
            }
        }
        let due: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.restart_at.is_some_and(|at| at <= self.now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.restart(id);
        }
        if self.partition.is_some() && self.now >= self.partition_heal_at {
            self.partition = None;
            self.trace(9_000_003, &[]);
        } else if self.partition.is_none() && self.rng.chance(self.params.partition) {
            let side: BTreeSet<NodeId> = self
                .nodes
                .keys()
                .copied()
                .filter(|_| self.rng.chance(0.5))
                .collect();
            self.partition = Some(side);
            self.partition_heal_at = self.now + self.rng.range(100, 2000);
            self.trace(9_000_004, &[]);
        }
        if self.rng.chance(self.params.membership) {
            self.change_membership();
        }
        if self.rng.chance(self.params.transfer) {
            if let Some(leader) = self.current_leader() {
                let voters: Vec<NodeId> = self.nodes[&leader]
                    .raw
                    .as_ref()
                    .map(|r| r.raft().conf_state().voters.iter().copied().collect())
                    .unwrap_or_default();
                if let Some(to) = self.rng.pick(&voters) {
                    let raw = self.nodes.get_mut(&leader).and_then(|n| n.raw.as_mut());
                    if let Some(raw) = raw {
                        if raw.transfer_leader(to).is_ok() {
                            self.stats.transfers += 1;
                        }
                    }
                }
            }
        }
    }

    fn change_membership(&mut self) {
        let Some(leader) = self.current_leader() else {
            return;
        };
        let Some(conf) = self.nodes[&leader]
            .raw
            .as_ref()
            .map(|r| r.raft().conf_state().clone())
        else {
            return;
        };
        if conf.is_joint() {
            return;
        }
        let voters: Vec<NodeId> = conf.voters.iter().copied().collect();
        let learners: Vec<NodeId> = conf.learners.iter().copied().collect();
        let spare_left = self.next_spare <= self.params.voters + self.params.spares;
        let choice = self.rng.range(0, 4);
        let steps = match choice {
            0 if spare_left => {
                let id = NodeId(self.next_spare);
                self.next_spare += 1;
                self.max_id = self.max_id.max(id.0);
                self.start_node(id, MemStorage::new());
                vec![ConfChangeStep::AddLearner(id)]
            }
            1 if !learners.is_empty() => {
                vec![ConfChangeStep::AddVoter(
                    self.rng.pick(&learners).expect("non-empty"),
                )]
            }
            2 if voters.len() > 3 => {
                vec![ConfChangeStep::RemoveNode(
                    self.rng.pick(&voters).expect("non-empty"),
                )]
            }
            3 if !learners.is_empty() && voters.len() >= 3 => {
                // Joint: promote a learner and demote a voter at once.
                let up = self.rng.pick(&learners).expect("non-empty");
                let down = self.rng.pick(&voters).expect("non-empty");
                vec![
                    ConfChangeStep::AddVoter(up),
                    ConfChangeStep::AddLearner(down),
                ]
            }
            _ => return,
        };
        if let Some(raw) = self.nodes.get_mut(&leader).and_then(|n| n.raw.as_mut()) {
            let _ = raw.propose_conf_change(&ConfChange::with_steps(steps));
        }
    }

    /// Retires peers whose removal committed (some peer applied it): the control plane
    /// shuts a removed replica down. Removed ids are never added again.
    fn retire_removed(&mut self) {
        for id in std::mem::take(&mut self.removed) {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.retired = true;
            }
        }
    }

    fn client_ops(&mut self) {
        for client in 0..self.params.clients {
            if self.client_busy.contains_key(&client) || !self.rng.chance(0.05) {
                continue;
            }
            let live = self.live_ids();
            // Clients route by what they last heard: any peer that believes it leads (a
            // deposed leader in a minority partition too), sometimes any peer at all.
            let leaders: Vec<NodeId> = live
                .iter()
                .copied()
                .filter(|id| {
                    self.nodes[id]
                        .raw
                        .as_ref()
                        .is_some_and(|r| r.raft().state == StateRole::Leader)
                })
                .collect();
            let target = if self.rng.chance(0.8) {
                self.rng.pick(&leaders)
            } else {
                None
            };
            let Some(node_id) = target.or_else(|| self.rng.pick(&live)) else {
                continue;
            };
            let key = self.rng.range(0, self.params.keys - 1);
            let op_id = self.next_op_id;
            self.next_op_id += 1;
            let is_write = self.rng.chance(0.5);
            let lease = self.rng.chance(0.5);
            let Some(node) = self.nodes.get_mut(&node_id) else {
                continue;
            };
            let Some(raw) = node.raw.as_mut() else {
                continue;
            };
            let accepted = if is_write {
                raw.propose(encode_write(op_id, key, op_id)).is_ok()
            } else {
                let context = Bytes::copy_from_slice(&op_id.to_le_bytes());
                let asked = if lease {
                    raw.lease_read(context)
                } else {
                    raw.read_index(context)
                };
                asked.is_ok()
            };
            if !accepted {
                continue;
            }
            if !is_write && lease {
                self.stats.lease_reads_asked += 1;
            }
            self.event_seq += 1;
            let call = self.event_seq;
            if !is_write {
                node.reads.insert(op_id, (client, key, call, None));
            }
            self.pending.insert(
                op_id,
                PendingOp {
                    client,
                    node: node_id,
                    key,
                    call,
                    deadline: self.now + 3000,
                    value: op_id,
                    is_write,
                },
            );
            self.client_busy.insert(client, op_id);
        }
    }

    fn serve_reads(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let node = self.nodes.get_mut(&id).expect("node");
            let ready: Vec<(u64, u64)> = node
                .reads
                .iter()
                .filter(|(_, r)| r.3.is_some_and(|index| index <= node.applied))
                .map(|(op, r)| (*op, r.1))
                .collect();
            let mut served = Vec::new();
            for (op_id, key) in ready {
                node.reads.remove(&op_id);
                served.push((op_id, node.kv.values.get(&key).copied()));
            }
            for (op_id, value) in served {
                self.complete(op_id, Some(value));
            }
        }
    }

    fn expire_ops(&mut self) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, op)| op.deadline <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for op_id in expired {
            let Some(op) = self.pending.remove(&op_id) else {
                continue;
            };
            self.client_busy.remove(&op.client);
            if op.is_write {
                // Unknown outcome: it may take effect at any later time, or never.
                self.history.push(Operation {
                    key: op.key,
                    call: op.call,
                    ret: u64::MAX,
                    op: RegisterOp::Write(op.value),
                });
            }
            if let Some(node) = self.nodes.get_mut(&op.node) {
                node.reads.remove(&op_id);
            }
        }
    }

    /// Whether the healed group has converged: one leader, every member applied everything
    /// it committed, and a write made in the liveness phase came back.
    fn converged(&self) -> bool {
        let Some(leader) = self.current_leader() else {
            return false;
        };
        let Some(raw) = self.nodes[&leader].raw.as_ref() else {
            return false;
        };
        let raft = raw.raft();
        let commit = raft.log.committed;
        if commit != raft.log.last_index() || self.liveness_writes_done == 0 {
            return false;
        }
        raft.conf_state().all_members().iter().all(|id| {
            self.nodes
                .get(id)
                .is_some_and(|n| n.raw.is_some() && n.applied == commit)
        })
    }

    fn check_replicas_equal(&self) -> Result<(), Failure> {
        let Some(leader) = self.current_leader() else {
            return Ok(());
        };
        let members = self.nodes[&leader]
            .raw
            .as_ref()
            .map(|r| r.raft().conf_state().all_members());
        let expected = &self.nodes[&leader].kv;
        for id in members.unwrap_or_default() {
            if let Some(node) = self.nodes.get(&id) {
                if &node.kv != expected {
                    return Err(self.fail(
                        FailureKind::Correctness,
                        format!("replica {id} state differs from leader {leader}'s"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn enter_liveness(&mut self) {
        self.partition = None;
        let down: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.raw.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            self.restart(id);
        }
        // The driver's failure detector would wake idle groups when peers come back.
        for node in self.nodes.values_mut() {
            if let Some(raw) = node.raw.as_mut() {
                raw.wake();
            }
        }
    }

    /// Every peer's state, for failure reports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (id, node) in &self.nodes {
            let Some(raw) = node.raw.as_ref() else {
                out.push_str(&format!("  {id}: down\n"));
                continue;
            };
            let raft = raw.raft();
            out.push_str(&format!(
                "  {id}: {:?} term {} leader {:?} commit {} applied {} last {} retired {} \
                 quiescent {} conf {:?}\n",
                raft.state,
                raft.term,
                raft.leader,
                raft.log.committed,
                node.applied,
                raft.log.last_index(),
                node.retired,
                raft.is_quiescent(),
                raft.conf_state()
            ));
            if raft.state == StateRole::Leader {
                for peer in raft.conf_state().all_members() {
                    if let Some(p) = raft.progress(peer) {
                        out.push_str(&format!(
                            "     {peer}: {:?} match {} next {} paused {} inflight {} snap {}/{}\n",
                            p.state,
                            p.matched,
                            p.next,
                            p.is_paused(),
                            p.inflights.count(),
                            p.snapshot_acked,
                            p.snapshot_total
                        ));
                    }
                }
            }
        }
        out
    }

    pub fn run(&mut self) -> Result<(), Failure> {
        let end = self.params.safety_time + self.params.liveness_time;
        while self.now < end {
            if self.now == self.params.safety_time {
                self.enter_liveness();
            }
            if !self.in_liveness() {
                self.inject_faults();
            }
            self.client_ops();
            self.deliver_due()?;
            self.tick_nodes();
            self.complete_io()?;
            for id in self.live_ids() {
                self.process_ready(id)?;
            }
            if self.in_flight.len() > 100_000 || self.stats.delivered > 5_000_000 {
                return Err(self.fail(
                    FailureKind::Liveness,
                    format!(
                        "message storm: {} in flight, {} delivered\n{}",
                        self.in_flight.len(),
                        self.stats.delivered,
                        self.describe()
                    ),
                ));
            }
            self.serve_reads();
            self.expire_ops();
            self.retire_removed();
            if self.in_liveness() && self.now % 50 == 0 && self.converged() {
                self.check_replicas_equal()?;
                // Writes still unanswered may or may not have taken effect.
                for op in self.pending.values().filter(|op| op.is_write) {
                    self.history.push(Operation {
                        key: op.key,
                        call: op.call,
                        ret: u64::MAX,
                        op: RegisterOp::Write(op.value),
                    });
                }
                return linearizability::check_history(&self.history)
                    .map_err(|what| self.fail(FailureKind::Correctness, what));
            }
            self.now += 1;
        }
        Err(self.fail(
            FailureKind::Liveness,
            format!(
                "no convergence within {} time units of healing (leader: {:?}, liveness writes \
                 {})\n{}",
                self.params.liveness_time,
                self.current_leader(),
                self.liveness_writes_done,
                self.describe()
            ),
        ))
    }
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!(
        "RAFT_SIM_SEED={seed} cargo test -p raftcore --test simulation replay_seed -- --ignored \
         --nocapture"
    )
}

/// Runs one seed; on failure, the message names the seed, what it drew and how to replay.
pub fn run_seed(seed: u64, options: Options) -> Result<(u64, Stats), String> {
    let mut world = World::new(seed, options);
    match world.run() {
        Ok(()) => Ok((world.trace_hash, world.stats.clone())),
        Err(failure) => Err(format!(
            "seed {seed} failed ({:?}) at t={}: {}\n  params: {:?}\n  replay: {}",
            failure.kind,
            failure.at,
            failure.what,
            world.params,
            replay_command(seed)
        )),
    }
}
