//! A seeded simulation of one copyset on three replicas, driving `CopysetCore` exactly as a
//! shard would: messages over a network that drops, delays, duplicates and partitions; persists
//! that finish late (and are lost when a replica crashes); applies that finish out of order
//! across chunks. Clients write versioned values to a few locations and read them back.
//!
//! Safety phase with faults, then a liveness phase where everything heals. Checks: replicas
//! converge to identical state; no acknowledged write is lost (each location holds at least
//! its last acknowledged version); no read returns a value older than a write acknowledged
//! before the read was issued. A failing seed prints how to replay it.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use raftcore::{ConfState, Config, LogIndex, MemStorage, Message, NodeId, RawNode, StateRole};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::core::{Action, CopysetCore, Token};
use super::op::ChunkOp;
use crate::ids::{ChunkId, CopysetId};

const REPLICAS: u64 = 3;
const CHUNKS: u64 = 3;
const SLOTS: u32 = 3;
const CLIENT_TIMEOUT: u64 = 400;

type Location = (ChunkId, u32);

#[derive(Debug)]
enum Work {
    Deliver {
        to: u64,
        message: Message,
    },
    Persisted {
        node: u64,
        incarnation: u64,
        action: Action,
    },
    Applied {
        node: u64,
        incarnation: u64,
        index: LogIndex,
        op: ChunkOp,
        token: Option<Token>,
    },
}

struct Replica {
    core: Option<CopysetCore<MemStorage>>,
    /// What survives a crash: the persisted log and hard state.
    disk: MemStorage,
    /// The state machine: location → version. Rebuilt by replay after a crash.
    state: BTreeMap<Location, u64>,
    incarnation: u64,
    /// When the last persist issued finishes.
    last_persist_due: u64,
}

struct Pending {
    location: Location,
    version: u64,
    acked_at_issue: u64,
    issued_at: u64,
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    now: u64,
    replicas: Vec<Replica>,
    queue: Vec<(u64, u64, Work)>, // (due, sequence, work)
    sequence: u64,
    cut: HashSet<(u64, u64)>,
    drop_percent: u32,
    duplicate_percent: u32,
    faults: bool,
    next_token: Token,
    pending: HashMap<Token, Pending>,
    busy: HashSet<Location>,
    next_version: HashMap<Location, u64>,
    last_acked: HashMap<Location, u64>,
    acked_writes: u64,
    served_reads: u64,
    trace: u64,
}

fn new_core(id: u64, disk: MemStorage, seed: u64) -> CopysetCore<MemStorage> {
    let mut config = Config::new(NodeId(id));
    config.rng_seed = seed ^ (id << 40);
    config.election_tick = 10;
    config.heartbeat_tick = 2;
    let node = RawNode::new(config, disk).expect("valid raft config");
    CopysetCore::new(CopysetId(1), node, LogIndex(0))
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let voters = (1..=REPLICAS).map(NodeId).collect();
        let conf = ConfState {
            voters,
            ..ConfState::default()
        };
        let replicas = (1..=REPLICAS)
            .map(|id| {
                let disk = MemStorage::new_with_conf_state(conf.clone());
                Replica {
                    core: Some(new_core(id, disk.clone(), seed)),
                    disk,
                    state: BTreeMap::new(),
                    incarnation: 0,
                    last_persist_due: 0,
                }
            })
            .collect();
        Sim {
            seed,
            drop_percent: rng.gen_range(0..15),
            duplicate_percent: rng.gen_range(0..5),
            rng,
            now: 0,
            replicas,
            queue: Vec::new(),
            sequence: 0,
            cut: HashSet::new(),
            faults: true,
            next_token: 1,
            pending: HashMap::new(),
            busy: HashSet::new(),
            next_version: HashMap::new(),
            last_acked: HashMap::new(),
            acked_writes: 0,
            served_reads: 0,
            trace: 0,
        }
    }

    fn fail(&self, why: String) -> ! {
        panic!(
            "copyset simulation seed {} failed at step {}: {why}\nreplay: \
             COPYSET_SIM_SEED={} cargo test -p dataplane copyset::sim_tests::replay_one_seed",
            self.seed, self.now, self.seed
        )
    }

    fn schedule(&mut self, delay: u64, work: Work) {
        self.sequence += 1;
        self.queue.push((self.now + delay, self.sequence, work));
    }

    fn record(&mut self, value: u64) {
        self.trace = self.trace.rotate_left(5) ^ value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    /// Carries out every action the replicas have.
    fn drain(&mut self) {
        loop {
            let mut progressed = false;
            for index in 0..self.replicas.len() {
                let node = index as u64 + 1;
                while let Some(action) = self.replicas[index]
                    .core
                    .as_mut()
                    .and_then(|core| core.next_action())
                {
                    progressed = true;
                    self.handle(node, action);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn handle(&mut self, node: u64, action: Action) {
        let incarnation = self.replicas[node as usize - 1].incarnation;
        match action {
            Action::Send(message) => {
                let to = message.to.0;
                self.record(to ^ (message.msg_type as u64) << 8);
                if self.faults && self.rng.gen_range(0..100) < self.drop_percent {
                    return;
                }
                let delay = self.rng.gen_range(1..6);
                if self.faults && self.rng.gen_range(0..100) < self.duplicate_percent {
                    self.schedule(
                        delay + 3,
                        Work::Deliver {
                            to,
                            message: message.clone(),
                        },
                    );
                }
                self.schedule(delay, Work::Deliver { to, message });
            }
            action @ Action::Persist { .. } => {
                // One log per replica: its writes finish in the order they were issued.
                let replica = &mut self.replicas[node as usize - 1];
                let due = (self.now + self.rng.gen_range(0..4)).max(replica.last_persist_due);
                replica.last_persist_due = due;
                let work = Work::Persisted {
                    node,
                    incarnation,
                    action,
                };
                self.schedule(due - self.now, work);
            }
            Action::Apply { index, op, token } => {
                let delay = self.rng.gen_range(0..4);
                self.schedule(
                    delay,
                    Work::Applied {
                        node,
                        incarnation,
                        index,
                        op,
                        token,
                    },
                );
            }
            Action::Refuse { token, .. } => {
                if let Some(pending) = self.pending.remove(&token) {
                    self.busy.remove(&pending.location);
                }
            }
            Action::Read { token } => {
                let Some(pending) = self.pending.remove(&token) else {
                    return;
                };
                self.busy.remove(&pending.location);
                let value = self.replicas[node as usize - 1]
                    .state
                    .get(&pending.location)
                    .copied()
                    .unwrap_or(0);
                if value < pending.acked_at_issue {
                    self.fail(format!(
                        "stale read on node {node} of {:?}: {value}, but version {} was \
                         acknowledged before the read was issued",
                        pending.location, pending.acked_at_issue
                    ));
                }
                let issued = self
                    .next_version
                    .get(&pending.location)
                    .copied()
                    .unwrap_or(0);
                if value > issued {
                    self.fail(format!("read a version {value} that was never written"));
                }
                self.served_reads += 1;
            }
            Action::RoleChanged { role, .. } => self.record(node << 4 ^ role as u64),
            // The simulation's membership is fixed.
            Action::ConfChanged { .. } => {}
        }
    }

    fn complete(&mut self, work: Work) {
        match work {
            Work::Deliver { to, message } => {
                let from = message.from.0;
                if self.cut.contains(&(from, to)) {
                    return;
                }
                if let Some(core) = self.replicas[to as usize - 1].core.as_mut() {
                    // Messages from unknown peers or stale terms are the core's to ignore.
                    let _ = core.step(message);
                }
            }
            Work::Persisted {
                node,
                incarnation,
                action,
            } => {
                let replica = &mut self.replicas[node as usize - 1];
                if replica.incarnation != incarnation || replica.core.is_none() {
                    return; // the replica crashed before this write finished: lost
                }
                let Action::Persist {
                    number,
                    snapshot,
                    entries,
                    hard_state,
                } = action
                else {
                    return;
                };
                if snapshot.is_some() {
                    self.fail("no snapshots expected: the simulation never compacts".into());
                }
                replica.disk.append(&entries);
                if let Some(hard_state) = hard_state {
                    replica.disk.set_hard_state(hard_state);
                }
                if let Some(core) = replica.core.as_mut() {
                    let store = core.node_mut().store_mut();
                    store.append(&entries);
                    if let Some(hard_state) = hard_state {
                        store.set_hard_state(hard_state);
                    }
                    core.on_persisted(number);
                }
            }
            Work::Applied {
                node,
                incarnation,
                index,
                op,
                token,
            } => {
                let replica = &mut self.replicas[node as usize - 1];
                if replica.incarnation != incarnation || replica.core.is_none() {
                    return;
                }
                let ChunkOp::Write {
                    chunk,
                    offset,
                    data,
                    ..
                } = &op
                else {
                    self.fail("only writes are proposed".into());
                };
                let mut word = [0u8; 8];
                word.copy_from_slice(&data[..8]);
                let version = u64::from_le_bytes(word);
                replica.state.insert((*chunk, *offset), version);
                if let Some(core) = replica.core.as_mut() {
                    core.on_applied(index, *chunk);
                }
                self.record(index.0 ^ version << 20);
                if let Some(token) = token {
                    if let Some(pending) = self.pending.remove(&token) {
                        self.busy.remove(&pending.location);
                        if pending.version != version {
                            self.fail(format!(
                                "client {token} acknowledged with version {version}, wrote {}",
                                pending.version
                            ));
                        }
                        let acked = self.last_acked.entry(pending.location).or_insert(0);
                        *acked = (*acked).max(version);
                        self.acked_writes += 1;
                    }
                }
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        (0..self.replicas.len()).find_map(|i| {
            let core = self.replicas[i].core.as_ref()?;
            (core.role() == StateRole::Leader).then_some(i as u64 + 1)
        })
    }

    fn client_step(&mut self) {
        // Requests that never got an answer (their replica crashed) are given up on.
        let now = self.now;
        let expired: Vec<Token> = self
            .pending
            .iter()
            .filter(|(_, p)| now - p.issued_at > CLIENT_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(pending) = self.pending.remove(&token) {
                self.busy.remove(&pending.location);
            }
        }
        if self.rng.gen_range(0..100) >= 30 {
            return;
        }
        let location = (
            ChunkId(self.rng.gen_range(0..CHUNKS)),
            self.rng.gen_range(0..SLOTS) * 4096,
        );
        if self.busy.contains(&location) {
            return;
        }
        let Some(leader) = self.leader() else { return };
        let token = self.next_token;
        self.next_token += 1;
        let acked_at_issue = self.last_acked.get(&location).copied().unwrap_or(0);
        let is_read = self.rng.gen_range(0..100) < 30;
        let version = if is_read {
            0
        } else {
            let next = self.next_version.entry(location).or_insert(0);
            *next += 1;
            *next
        };
        self.busy.insert(location);
        self.pending.insert(
            token,
            Pending {
                location,
                version,
                acked_at_issue,
                issued_at: self.now,
            },
        );
        let Some(core) = self.replicas[leader as usize - 1].core.as_mut() else {
            return;
        };
        if is_read {
            core.read(token);
        } else {
            let op = ChunkOp::Write {
                chunk: location.0,
                sn: 1,
                offset: location.1,
                data: Bytes::copy_from_slice(&version.to_le_bytes()),
            };
            core.propose(op.encode(), token);
        }
    }

    fn fault_step(&mut self) {
        let roll = self.rng.gen_range(0..1000);
        let node = self.rng.gen_range(1..=REPLICAS);
        match roll {
            0..=2 => {
                // Crash: volatile state and unfinished writes are gone.
                let replica = &mut self.replicas[node as usize - 1];
                if replica.core.take().is_some() {
                    replica.incarnation += 1;
                    replica.state.clear();
                }
            }
            3..=12 => {
                let replica = &mut self.replicas[node as usize - 1];
                if replica.core.is_none() {
                    let seed = self.seed ^ replica.incarnation;
                    replica.core = Some(new_core(node, replica.disk.clone(), seed));
                }
            }
            13..=14 => {
                for other in 1..=REPLICAS {
                    if other != node {
                        self.cut.insert((node, other));
                        self.cut.insert((other, node));
                    }
                }
            }
            15..=16 => {
                let other = self.rng.gen_range(1..=REPLICAS);
                self.cut.insert((node, other)); // one-way loss
            }
            17..=24 => self.cut.clear(),
            _ => {}
        }
    }

    /// One step of the safety phase: faults and clients, then the clock and the network.
    fn step(&mut self) {
        self.now += 1;
        self.tick_all();
        if self.faults {
            self.fault_step();
        }
        self.client_step();
        self.drain();
        self.complete_due();
    }

    fn tick_all(&mut self) {
        if self.now % 2 == 0 {
            for replica in &mut self.replicas {
                if let Some(core) = replica.core.as_mut() {
                    core.tick();
                }
            }
        }
    }

    /// Completes every piece of work due now, in (due, sequence) order.
    fn complete_due(&mut self) {
        let now = self.now;
        let mut due: Vec<(u64, u64, Work)> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].0 <= now {
                due.push(self.queue.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(at, sequence, _)| (*at, *sequence));
        for (_, _, work) in due {
            self.complete(work);
            self.drain();
        }
    }

    fn heal(&mut self) {
        self.faults = false;
        self.cut.clear();
        for node in 1..=REPLICAS {
            let replica = &mut self.replicas[node as usize - 1];
            if replica.core.is_none() {
                let seed = self.seed ^ replica.incarnation;
                replica.core = Some(new_core(node, replica.disk.clone(), seed));
            }
        }
    }

    fn converged(&self) -> bool {
        let first = &self.replicas[0];
        // Heartbeats keep messages in flight forever; convergence is about state.
        self.pending.is_empty()
            && self.replicas.iter().all(|r| {
                r.state == first.state
                    && r.core.as_ref().map(|c| c.applied())
                        == first.core.as_ref().map(|c| c.applied())
            })
    }

    /// Runs the whole schedule; returns the trace hash.
    fn run(mut self, steps: u64) -> u64 {
        for _ in 0..steps {
            self.step();
        }
        self.heal();
        let mut quiet = 0;
        for _ in 0..20_000 {
            // Clients stop issuing in the liveness phase; only what is in flight finishes.
            let pending_before = self.pending.len();
            self.now += 1;
            self.tick_all();
            self.drain();
            self.complete_due();
            let now = self.now;
            let expired: Vec<Token> = self
                .pending
                .iter()
                .filter(|(_, p)| now - p.issued_at > CLIENT_TIMEOUT)
                .map(|(t, _)| *t)
                .collect();
            for token in expired {
                self.pending.remove(&token);
            }
            if pending_before == 0 && self.converged() && self.leader().is_some() {
                quiet += 1;
                if quiet > 50 {
                    break;
                }
            } else {
                quiet = 0;
            }
        }
        if !self.converged() {
            let applied: Vec<_> = self
                .replicas
                .iter()
                .map(|r| r.core.as_ref().map(|c| c.applied()))
                .collect();
            self.fail(format!(
                "replicas did not converge after healing: applied {applied:?}"
            ));
        }
        let state = self.replicas[0].state.clone();
        for (location, acked) in &self.last_acked {
            let value = state.get(location).copied().unwrap_or(0);
            if value < *acked {
                self.fail(format!(
                    "acknowledged write lost at {location:?}: holds version {value}, \
                     version {acked} was acknowledged"
                ));
            }
        }
        if self.acked_writes == 0 {
            self.fail("no write was acknowledged: the cluster never made progress".into());
        }
        self.trace ^ self.served_reads
    }
}

fn run_seed(seed: u64) -> u64 {
    Sim::new(seed).run(3_000)
}

#[test]
fn copysets_lose_no_acknowledged_write_under_faults() {
    for seed in 0..24 {
        run_seed(seed);
    }
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    assert_eq!(run_seed(7), run_seed(7));
    assert_ne!(run_seed(7), run_seed(8), "different seeds, different runs");
}

/// Replays one seed (`COPYSET_SIM_SEED`), or runs many (`COPYSET_SIM_SEEDS`, from
/// `COPYSET_SIM_FIRST`): the by-hand soak.
#[test]
#[ignore = "by hand: COPYSET_SIM_SEED=N or COPYSET_SIM_SEEDS=COUNT"]
fn replay_one_seed() {
    if let Some(seed) = std::env::var("COPYSET_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed);
        return;
    }
    let count: u64 = std::env::var("COPYSET_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("COPYSET_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let started = std::time::Instant::now();
    for seed in first..first + count {
        run_seed(seed);
    }
    println!(
        "{count} copyset seeds from {first} ran clean in {:.1?}",
        started.elapsed()
    );
}

/// Runs one replica's actions: persists at once, collects applies (not reported), and
/// returns the membership records and answers it produced.
fn run_alone(
    core: &mut CopysetCore<MemStorage>,
    applies: &mut Vec<(LogIndex, ChunkId)>,
) -> Vec<Action> {
    let mut other = Vec::new();
    while let Some(action) = core.next_action() {
        match action {
            Action::Persist {
                number,
                entries,
                hard_state,
                ..
            } => {
                let store = core.node_mut().store_mut();
                store.append(&entries);
                if let Some(hard_state) = hard_state {
                    store.set_hard_state(hard_state);
                }
                core.on_persisted(number);
            }
            Action::Apply { index, op, .. } => applies.push((index, op.chunk())),
            Action::Send(_) | Action::RoleChanged { .. } => {}
            action => other.push(action),
        }
    }
    other
}

/// A copyset whose only voter is this replica, elected.
fn single_voter_leader() -> (CopysetCore<MemStorage>, Vec<(LogIndex, ChunkId)>) {
    let conf = ConfState {
        voters: [NodeId(1)].into_iter().collect(),
        ..ConfState::default()
    };
    let mut core = new_core(1, MemStorage::new_with_conf_state(conf), 7);
    let mut applies = Vec::new();
    for _ in 0..40 {
        core.tick();
        run_alone(&mut core, &mut applies);
        if core.role() == StateRole::Leader {
            break;
        }
    }
    (core, applies)
}

/// A membership change is applied to raft when delivered, but its `ConfChanged` (what the
/// shell records with the applied index) waits until every entry before it is applied; the
/// proposer is answered by it.
#[test]
fn a_membership_change_is_recorded_only_once_everything_before_it_is_applied() {
    let (mut core, mut applies) = single_voter_leader();
    assert_eq!(
        core.role(),
        StateRole::Leader,
        "a single voter elects itself"
    );
    let write = ChunkOp::Write {
        chunk: ChunkId(1),
        sn: 1,
        offset: 0,
        data: Bytes::from(vec![1u8; 4096]),
    };
    core.propose(write.encode(), 1);
    assert!(run_alone(&mut core, &mut applies).is_empty());
    let (write_index, chunk) = *applies.last().expect("the write is handed out");
    let change =
        raftcore::ConfChange::with_steps(vec![raftcore::ConfChangeStep::AddLearner(NodeId(2))]);
    core.propose_conf_change(&change, 2);
    // Committed and applied to raft, but the write before it is not applied yet.
    assert!(run_alone(&mut core, &mut applies).is_empty());
    assert!(core.conf_state().learners.contains(&NodeId(2)));
    // A second change is refused while the first is not applied: retry later.
    core.propose_conf_change(&change, 3);
    let refused = run_alone(&mut core, &mut applies);
    assert!(
        matches!(
            refused.as_slice(),
            [Action::Refuse {
                token: 3,
                refusal: super::core::Refusal::Busy(_)
            }]
        ),
        "{refused:?}"
    );
    core.on_applied(write_index, chunk);
    let recorded = run_alone(&mut core, &mut applies);
    match recorded.as_slice() {
        [Action::ConfChanged {
            index,
            conf_state,
            tokens,
        }] => {
            assert_eq!(*index, write_index.next());
            assert!(conf_state.learners.contains(&NodeId(2)));
            assert_eq!(tokens, &vec![2]);
            assert!(core.applied() >= *index);
        }
        other => panic!("expected one ConfChanged, got {other:?}"),
    }
}

/// Clone operations and deletes are barriers: one waits for every earlier apply, and nothing
/// later starts until it is done; other chunks' writes otherwise run concurrently.
#[test]
fn a_barrier_applies_alone_between_what_comes_before_and_after_it() {
    let (mut core, mut applies) = single_voter_leader();
    assert_eq!(core.role(), StateRole::Leader);
    let write = |chunk: u64| ChunkOp::Write {
        chunk: ChunkId(chunk),
        sn: 1,
        offset: 0,
        data: Bytes::from(vec![1u8; 4096]),
    };
    let ops = [
        write(1),
        write(2),
        ChunkOp::CreateClone {
            chunk: ChunkId(3),
            source: ChunkId(1),
            sn: 1,
        },
        write(1),
        write(4),
        ChunkOp::Flatten { chunk: ChunkId(3) },
    ];
    for (token, op) in ops.iter().enumerate() {
        core.propose(op.encode(), token as u64 + 10);
    }
    run_alone(&mut core, &mut applies);
    let chunks = |applies: &[(LogIndex, ChunkId)]| -> Vec<u64> {
        applies.iter().map(|(_, c)| c.0).collect()
    };
    // The two writes before the clone run together; the clone waits for both.
    let before = applies.len();
    assert_eq!(chunks(&applies[before - 2..]), vec![1, 2]);
    let (first, second) = (applies[before - 2], applies[before - 1]);
    core.on_applied(first.0, first.1);
    run_alone(&mut core, &mut applies);
    assert_eq!(applies.len(), before, "the clone waits for chunk 2's write");
    core.on_applied(second.0, second.1);
    run_alone(&mut core, &mut applies);
    assert_eq!(chunks(&applies[before..]), vec![3], "then the clone, alone");
    let clone = applies[before];
    core.on_applied(clone.0, clone.1);
    run_alone(&mut core, &mut applies);
    // The writes after it run together; the flatten waits for both.
    assert_eq!(chunks(&applies[before + 1..]), vec![1, 4]);
    let (third, fourth) = (applies[before + 1], applies[before + 2]);
    core.on_applied(fourth.0, fourth.1);
    core.on_applied(third.0, third.1);
    run_alone(&mut core, &mut applies);
    assert_eq!(chunks(&applies[before + 3..]), vec![3]);
    let flatten = applies[before + 3];
    core.on_applied(flatten.0, flatten.1);
    run_alone(&mut core, &mut applies);
    assert!(!core.applies_in_flight());
    assert_eq!(core.applied(), flatten.0);
}
