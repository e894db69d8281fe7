//! raftbench: committed entries per second of raftcore beside raft-rs (the `raft` crate, 0.7)
//! on the same workload, in one run: three voters in one process, in-memory storage, a stream
//! of proposals of 64 bytes and of 4 KiB, proposed in batches that each library turns into one
//! append per follower. Messages pass between the peers in memory, unserialized, for both.
//!
//! The driver loop is the same for both: the leader proposes a batch, then every peer handles
//! its ready (send, persist to memory, apply) and messages are delivered until nothing moves.
//! The figure counts application entries the leader applied.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "raftbench",
    about = "raftcore vs raft-rs: committed entries per second"
)]
struct Args {
    /// Entries of 64 bytes per run.
    #[arg(long, default_value_t = 200_000)]
    small_entries: usize,
    /// Entries of 4 KiB per run.
    #[arg(long, default_value_t = 40_000)]
    large_entries: usize,
    /// Proposals per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Runs of each library per workload; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run only raftcore (for profiling); no ratio is printed then.
    #[arg(long)]
    only_raftcore: bool,
}

const VOTERS: u64 = 3;
/// Upper bound of driver iterations per batch: a stuck group fails the benchmark loudly.
const MAX_DRIVE_ROUNDS: usize = 10_000;

/// One library under the same driver.
trait Group {
    fn name(&self) -> &'static str;
    fn propose(&mut self, payload: &Bytes);
    /// Handles every ready and delivers every message until nothing moves; returns the number
    /// of application entries the leader applied.
    fn drive(&mut self) -> usize;
}

mod with_raftcore {
    use super::*;
    use raftcore::{ConfState, Config, MemStorage, Message, NodeId, RawNode, StateRole};

    pub struct RaftcoreGroup {
        nodes: Vec<RawNode<MemStorage>>,
        queue: VecDeque<Message>,
    }

    impl RaftcoreGroup {
        pub fn new() -> RaftcoreGroup {
            let conf = ConfState {
                voters: (1..=VOTERS).map(NodeId).collect(),
                ..ConfState::default()
            };
            let nodes = (1..=VOTERS)
                .map(|id| {
                    let mut config = Config::new(NodeId(id));
                    config.max_size_per_msg = 1 << 20;
                    config.max_inflight_msgs = 256;
                    config.max_inflight_bytes = u64::MAX / 2;
                    config.max_committed_size_per_ready = u64::MAX;
                    config.max_uncommitted_bytes = u64::MAX / 2;
                    RawNode::new(config, MemStorage::new_with_conf_state(conf.clone()))
                        .expect("valid config")
                })
                .collect();
            let mut group = RaftcoreGroup {
                nodes,
                queue: VecDeque::new(),
            };
            group.nodes[0].campaign();
            group.drive();
            assert_eq!(
                group.nodes[0].raft().state,
                StateRole::Leader,
                "node 1 leads"
            );
            group
        }

        fn handle_ready(&mut self, i: usize) -> usize {
            let node = &mut self.nodes[i];
            let mut applied = 0;
            while node.has_ready() {
                let mut ready = node.ready().expect("ready");
                self.queue.extend(ready.messages.drain(..));
                if let Some(snapshot) = ready.snapshot.take() {
                    node.store_mut().apply_snapshot(snapshot);
                }
                node.store_mut().append(&ready.entries);
                if let Some(hard_state) = ready.hard_state {
                    node.store_mut().set_hard_state(hard_state);
                }
                applied += ready
                    .committed_entries
                    .iter()
                    .filter(|e| !e.data.is_empty())
                    .count();
                node.advance(&ready);
            }
            if i == 0 {
                applied
            } else {
                0
            }
        }
    }

    impl Group for RaftcoreGroup {
        fn name(&self) -> &'static str {
            "raftcore"
        }

        fn propose(&mut self, payload: &Bytes) {
            self.nodes[0]
                .propose(payload.clone())
                .expect("leader accepts");
        }

        fn drive(&mut self) -> usize {
            let mut applied = 0;
            for _ in 0..MAX_DRIVE_ROUNDS {
                for i in 0..self.nodes.len() {
                    applied += self.handle_ready(i);
                }
                if self.queue.is_empty() {
                    return applied;
                }
                while let Some(msg) = self.queue.pop_front() {
                    let to = (msg.to.0 - 1) as usize;
                    self.nodes[to].step(msg).expect("step");
                }
            }
            panic!("raftcore group did not settle");
        }
    }
}

mod with_raft_rs {
    use super::*;
    use raft::prelude::{ConfState, Message};
    use raft::storage::MemStorage;
    use raft::{Config, RawNode, StateRole};

    pub struct RaftRsGroup {
        nodes: Vec<RawNode<MemStorage>>,
        queue: VecDeque<Message>,
    }

    impl RaftRsGroup {
        pub fn new() -> RaftRsGroup {
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            let voters: Vec<u64> = (1..=VOTERS).collect();
            let nodes = (1..=VOTERS)
                .map(|id| {
                    let config = Config {
                        id,
                        election_tick: 10,
                        heartbeat_tick: 2,
                        max_size_per_msg: 1 << 20,
                        max_inflight_msgs: 256,
                        ..Config::default()
                    };
                    config.validate().expect("valid config");
                    let storage =
                        MemStorage::new_with_conf_state(ConfState::from((voters.clone(), vec![])));
                    RawNode::new(&config, storage, &logger).expect("raft-rs node")
                })
                .collect();
            let mut group = RaftRsGroup {
                nodes,
                queue: VecDeque::new(),
            };
            group.nodes[0].campaign().expect("campaign");
            group.drive();
            assert_eq!(group.nodes[0].raft.state, StateRole::Leader, "node 1 leads");
            group
        }

        fn handle_ready(&mut self, i: usize) -> usize {
            let node = &mut self.nodes[i];
            let mut applied = 0;
            while node.has_ready() {
                let mut ready = node.ready();
                self.queue.extend(ready.take_messages());
                if !ready.snapshot().is_empty() {
                    let snapshot = ready.snapshot().clone();
                    node.mut_store()
                        .wl()
                        .apply_snapshot(snapshot)
                        .expect("snapshot");
                }
                applied += ready
                    .take_committed_entries()
                    .iter()
                    .filter(|e| !e.get_data().is_empty())
                    .count();
                if !ready.entries().is_empty() {
                    node.mut_store()
                        .wl()
                        .append(ready.entries())
                        .expect("append");
                }
                if let Some(hard_state) = ready.hs() {
                    node.mut_store().wl().set_hardstate(hard_state.clone());
                }
                self.queue.extend(ready.take_persisted_messages());
                let mut light = node.advance(ready);
                if let Some(commit) = light.commit_index() {
                    node.mut_store().wl().mut_hard_state().set_commit(commit);
                }
                self.queue.extend(light.take_messages());
                applied += light
                    .take_committed_entries()
                    .iter()
                    .filter(|e| !e.get_data().is_empty())
                    .count();
                node.advance_apply();
            }
            if i == 0 {
                applied
            } else {
                0
            }
        }
    }

    impl Group for RaftRsGroup {
        fn name(&self) -> &'static str {
            "raft-rs 0.7"
        }

        fn propose(&mut self, payload: &Bytes) {
            self.nodes[0]
                .propose(Vec::new(), payload.to_vec())
                .expect("leader accepts");
        }

        fn drive(&mut self) -> usize {
            let mut applied = 0;
            for _ in 0..MAX_DRIVE_ROUNDS {
                for i in 0..self.nodes.len() {
                    applied += self.handle_ready(i);
                }
                if self.queue.is_empty() {
                    return applied;
                }
                while let Some(msg) = self.queue.pop_front() {
                    let to = (msg.to - 1) as usize;
                    self.nodes[to].step(msg).expect("step");
                }
            }
            panic!("raft-rs group did not settle");
        }
    }
}

/// Proposes `entries` payloads in batches and drives until the leader applied them all.
fn run(group: &mut dyn Group, payload: &Bytes, entries: usize, batch: usize) -> Duration {
    let started = Instant::now();
    let mut proposed = 0;
    let mut applied = 0;
    while applied < entries {
        let now = batch.min(entries - proposed);
        for _ in 0..now {
            group.propose(payload);
        }
        proposed += now;
        applied += group.drive();
        assert!(
            applied <= proposed,
            "{} applied more than proposed",
            group.name()
        );
        assert!(
            now > 0 || applied == entries,
            "{} lost entries",
            group.name()
        );
    }
    started.elapsed()
}

fn best_rate(make: &dyn Fn() -> Box<dyn Group>, payload: &Bytes, args: &Args, n: usize) -> f64 {
    (0..args.runs.max(1))
        .map(|_| {
            let mut group = make();
            let elapsed = run(group.as_mut(), payload, n, args.batch);
            n as f64 / elapsed.as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let args = Args::parse();
    println!(
        "raftbench: 3 voters in one process, in-memory storage, batches of {}, best of {} runs",
        args.batch, args.runs
    );
    println!(
        "{:<10} {:>9} {:>20} {:>20} {:>8}",
        "payload", "entries", "raftcore entries/s", "raft-rs entries/s", "ratio"
    );
    for (label, size, entries) in [
        ("64 B", 64usize, args.small_entries),
        ("4 KiB", 4096, args.large_entries),
    ] {
        let payload = Bytes::from(vec![0xa5u8; size]);
        let ours = best_rate(
            &|| Box::new(with_raftcore::RaftcoreGroup::new()) as Box<dyn Group>,
            &payload,
            &args,
            entries,
        );
        if args.only_raftcore {
            println!("{:<10} {:>9} {:>20.0}", label, entries, ours);
            continue;
        }
        let baseline = best_rate(
            &|| Box::new(with_raft_rs::RaftRsGroup::new()) as Box<dyn Group>,
            &payload,
            &args,
            entries,
        );
        println!(
            "{:<10} {:>9} {:>20.0} {:>20.0} {:>7.2}x",
            label,
            entries,
            ours,
            baseline,
            ours / baseline
        );
    }
}
